"""The batch extraction job's contract: the Parquet schema of its shards and the pydantic models of its
configuration, identity, input-manifest rows, error records and summary.

Both engines (`service.extraction` locally, `service.extraction_ray` on Ray Data) write through
`build_shard_table`, so their shards share one schema. docs/EXTRACTION.md documents it for users.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.artifact import Manifest
from models.decoding import DEFAULT_MAX_PIXELS

SCHEMA_VERSION = 1
METADATA_KEY = b"transfer_serve.extraction"

EmbeddingDType = Literal["float32", "float16"]
EngineName = Literal["local", "ray"]

SHARD_PATTERN = "part-{:05d}.parquet"
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
ERRORS_FILE = "_errors.jsonl"
ERRORS_DIR = "_errors"
"""Everything but the shards starts with '_' so `pd.read_parquet(OUT_DIR)` reads the shards alone."""


class ExtractionError(ValueError):
    """The extraction job cannot run as asked; the message says what to change."""


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def errors_name(index: int) -> str:
    return f"{ERRORS_DIR}/part-{index:05d}.jsonl"


class RayOptions(BaseModel):
    """How `--engine ray` spreads the job: inference actors, their GPUs, and the decoding tasks."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(default=1, ge=1, description="Inference actors (each holds one loaded runtime).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per inference actor (0: run on CPU).")
    cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs reserved per inference actor.")
    decode_cpus: float = Field(default=1.0, gt=0, description="CPUs per decoding task.")
    local_num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of a local Ray started by the job (ignored when joining RAY_ADDRESS)."
    )


class ExtractionConfig(BaseModel):
    """Every option of `transfer-serve extract`, validated in one place."""

    model_config = ConfigDict(extra="forbid")

    artifact: Path = Field(description="Artifact directory (manifest.json, model.onnx, model.ts).")
    input: Path = Field(description="Image folder (searched recursively), or a .csv / .parquet manifest with a 'path' column.")
    output: Path = Field(description="Output folder for the Parquet shards, errors and summary.")
    batch_size: int = Field(default=64, ge=1, description="Images per forward pass.")
    shard_size: int = Field(default=4096, ge=1, description="Images per Parquet shard (the unit of resume).")
    workers: int = Field(default=2, ge=0, description="Local engine: image-decoding worker processes (0: in-process).")
    top_k: int = Field(default=5, ge=1, description="Labels kept per image (capped at the number of classes).")
    embedding_dtype: EmbeddingDType = "float32"
    runtime: Literal["auto", "onnx", "torchscript"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="Larger images are recorded as errors.")
    engine: EngineName = "local"
    ray: RayOptions = Field(default_factory=RayOptions)
    show_progress: bool = True


class InputRow(BaseModel):
    """One row of an input manifest (.csv or .parquet): the image's path; other columns are ignored."""

    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("empty path")
        return value


class JobIdentity(BaseModel):
    """What makes two runs the same job; stored in OUT_DIR/_job.json and checked before resuming."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    inputs_sha256: str = Field(description="sha256 of the sorted, de-duplicated input paths, one per line.")
    inputs_count: int
    artifact_name: str
    artifact_version: str
    artifact_sha256: str = Field(description="sha256 of the artifact's file hashes (so: of its model files).")
    runtime: str = Field(description="Resolved runtime: onnx or torchscript.")
    precision: str
    shard_size: int
    top_k: int
    embedding_dtype: EmbeddingDType
    max_pixels: int

    def differences(self, other: "JobIdentity") -> list[str]:
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{key} {theirs[key]!r} -> {mine[key]!r}" for key in mine if mine[key] != theirs[key]]


class ErrorRecord(BaseModel):
    """One input that produced no row: its position in the sorted input list, path and reason."""

    index: int
    path: str
    reason: str


class ExtractionSummary(BaseModel):
    """Written to OUT_DIR/_summary.json at the end of every run (counts cover the whole output)."""

    model_config = ConfigDict(protected_namespaces=())

    output: str
    input: str
    engine: EngineName
    artifact_name: str
    artifact_version: str
    artifact_sha256: str
    runtime: str
    device: str
    precision: str
    embedding_dim: int
    embedding_dtype: EmbeddingDType
    top_k: int
    images: int = Field(description="Inputs of the job (sorted, de-duplicated).")
    duplicates_dropped: int
    rows: int = Field(description="Images with a row in the shards.")
    errors: int = Field(description="Images recorded in _errors.jsonl instead.")
    shards: int
    shards_skipped: int = Field(description="Shards already complete when this run started (resume).")
    shards_written: int = Field(description="Shards written by this run.")
    images_this_run: int
    elapsed_s: float
    images_per_second: float = Field(description="Images of this run / wall time of this run, end to end.")
    started_at: datetime
    finished_at: datetime
    schema_version: int = SCHEMA_VERSION


def artifact_sha256(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()


def inputs_sha256(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def effective_top_k(top_k: int, manifest: Manifest) -> int:
    return max(1, min(top_k, manifest.num_classes))


def shard_schema(embedding_dim: int, top_k: int, embedding_dtype: EmbeddingDType, metadata: dict | None = None) -> pa.Schema:
    """The Parquet schema of every shard (see docs/EXTRACTION.md)."""
    value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
    fields = [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("element", value_type, nullable=False), embedding_dim), nullable=False),
        pa.field("top1_label", pa.string(), nullable=False),
        pa.field("top1_probability", pa.float32(), nullable=False),
        pa.field("topk_labels", pa.list_(pa.field("element", pa.string(), nullable=False), top_k), nullable=False),
        pa.field(
            "topk_probabilities", pa.list_(pa.field("element", pa.float32(), nullable=False), top_k), nullable=False
        ),
    ]
    encoded = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    return pa.schema(fields, metadata=encoded)


def schema_for(identity: JobIdentity, manifest: Manifest) -> pa.Schema:
    """The shard schema of one job, carrying the artifact and options in its metadata (no timestamps,
    so a resumed run writes byte-identical shards)."""
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "artifact_name": identity.artifact_name,
        "artifact_version": identity.artifact_version,
        "artifact_sha256": identity.artifact_sha256,
        "runtime": identity.runtime,
        "precision": identity.precision,
        "embedding_dim": manifest.embedding_dim,
        "embedding_dtype": identity.embedding_dtype,
        "top_k": identity.top_k,
        "labels": manifest.labels,
    }
    return shard_schema(manifest.embedding_dim, identity.top_k, identity.embedding_dtype, metadata)


def build_shard_table(outputs: dict[str, np.ndarray], labels: Sequence[str], schema: pa.Schema) -> pa.Table:
    """One shard's rows from `EmbeddingPredictor` outputs (successful rows only), sorted by input index.

    `outputs` holds `index` (N,), `path` (N,), `embedding` (N, D), `topk_indices` (N, k) into `labels`
    and `topk_probabilities` (N, k), best first.
    """
    embedding_type = schema.field("embedding").type
    topk_labels_type = schema.field("topk_labels").type
    topk_probabilities_type = schema.field("topk_probabilities").type
    dim, top_k = embedding_type.list_size, topk_labels_type.list_size

    index = np.asarray(outputs["index"], dtype=np.int64).reshape(-1)
    order = np.argsort(index, kind="stable")
    paths = np.asarray(outputs["path"], dtype=object).reshape(-1)[order]
    embeddings = np.asarray(outputs["embedding"]).reshape(-1, dim)[order]
    embeddings = embeddings.astype(embedding_type.value_type.to_pandas_dtype(), copy=False)
    topk_indices = np.asarray(outputs["topk_indices"], dtype=np.int64).reshape(-1, top_k)[order]
    topk_probabilities = np.asarray(outputs["topk_probabilities"], dtype=np.float32).reshape(-1, top_k)[order]
    topk_labels = np.asarray(list(labels), dtype=object)[topk_indices]

    columns = [
        pa.array(index[order], pa.int64()),
        pa.array([str(p) for p in paths], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), type=embedding_type),
        pa.array(topk_labels[:, 0], pa.string()),
        pa.array(topk_probabilities[:, 0], pa.float32()),
        pa.FixedSizeListArray.from_arrays(pa.array(topk_labels.reshape(-1), pa.string()), type=topk_labels_type),
        pa.FixedSizeListArray.from_arrays(pa.array(topk_probabilities.reshape(-1)), type=topk_probabilities_type),
    ]
    return pa.Table.from_arrays(columns, schema=schema)
