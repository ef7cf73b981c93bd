"""The job's plan, fixed before any image is read: inputs, shards, the resolved runtime, and the job's identity
(what makes two runs the same job, stored in OUT/_job.json and checked before resuming)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from extraction.config import EmbeddingDType, ExtractionConfig, ExtractionError
from extraction.inputs import InputList, list_inputs
from extraction.table import SCHEMA_VERSION, shard_schema
from models.artifact import Manifest, load_artifact
from models.inference import DeviceError, ResolvedInference, cap_top_k, resolve_inference


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


def artifact_sha256(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()


def inputs_sha256(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def effective_top_k(top_k: int, manifest: Manifest) -> int:
    return cap_top_k(top_k, manifest.num_classes)


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
    if manifest.ood is not None:
        metadata |= {"ood_method": manifest.ood.method, "ood_threshold": manifest.ood.threshold}
    return shard_schema(
        manifest.embedding_dim, identity.top_k, identity.embedding_dtype, metadata, ood=manifest.ood is not None
    )


def resolve_execution(config: ExtractionConfig, cuda_available: bool | None = None) -> ResolvedInference:
    """The runtime, device and precision the job runs with: `models.inference.resolve_inference`, the service's
    rule, asked about the inference processes' GPUs (`config.cuda_available()` unless the caller says)."""
    available = config.cuda_available() if cuda_available is None else cuda_available
    try:
        return resolve_inference(config, available)
    except DeviceError as exc:
        raise ExtractionError(str(exc)) from None


@dataclass(frozen=True)
class JobPlan:
    """Everything fixed before any image is read: inputs, shards, identity, schema, resolved runtime."""

    config: ExtractionConfig
    manifest: Manifest
    inputs: InputList
    identity: JobIdentity
    schema: pa.Schema
    inference: ResolvedInference

    @property
    def shard_count(self) -> int:
        return -(-len(self.inputs.paths) // self.config.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.config.shard_size
        return range(start, min(start + self.config.shard_size, len(self.inputs.paths)))

    def predictor_kwargs(self) -> dict:
        """Constructor arguments of `EmbeddingPredictor` (plain data, so Ray can ship them to actors)."""
        return dict(
            artifact=str(Path(self.config.artifact).resolve()),  # actors may run elsewhere
            options=self.inference.as_options().model_dump(),
            top_k=self.identity.top_k,
            embedding_dtype=self.config.embedding_dtype,
        )


def plan_job(config: ExtractionConfig) -> JobPlan:
    """Read the artifact's manifest, list the inputs, resolve the runtime and fix the job's identity."""
    manifest = load_artifact(config.artifact).manifest
    inputs = list_inputs(config.input)
    inference = resolve_execution(config)
    identity = JobIdentity(
        inputs_sha256=inputs_sha256(inputs.paths),
        inputs_count=len(inputs.paths),
        artifact_name=manifest.name,
        artifact_version=manifest.version,
        artifact_sha256=artifact_sha256(manifest),
        runtime=inference.runtime,
        precision=inference.precision,
        shard_size=config.shard_size,
        top_k=effective_top_k(config.top_k, manifest),
        embedding_dtype=config.embedding_dtype,
        max_pixels=config.max_pixels,
    )
    return JobPlan(config, manifest, inputs, identity, schema_for(identity, manifest), inference)
