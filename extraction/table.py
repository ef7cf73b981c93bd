"""The Parquet schema of the extraction job's shards and the Arrow table builder both engines write through,
so their shards share one schema. docs/EXTRACTION.md documents it for users."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa

from extraction.config import EmbeddingDType

SCHEMA_VERSION = 1
METADATA_KEY = b"transfer_serve.extraction"


def shard_schema(
    embedding_dim: int, top_k: int, embedding_dtype: EmbeddingDType, metadata: dict | None = None, ood: bool = False
) -> pa.Schema:
    """The Parquet schema of every shard (see docs/EXTRACTION.md); `ood`: the artifact has an out-of-distribution
    detector, so rows also get `ood_score` (float32) and `unknown` (bool)."""
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
    if ood:
        fields += [pa.field("ood_score", pa.float32(), nullable=True), pa.field("unknown", pa.bool_(), nullable=False)]
    encoded = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    return pa.schema(fields, metadata=encoded)


def build_shard_table(outputs: dict[str, np.ndarray], labels: Sequence[str], schema: pa.Schema) -> pa.Table:
    """One shard's rows from `EmbeddingPredictor` outputs (successful rows only), sorted by input index.

    `outputs` holds `index` (N,), `path` (N,), `embedding` (N, D), `topk_indices` (N, k) into `labels`
    and `topk_probabilities` (N, k), best first; with an OOD detector also `ood_score` (N,) and `unknown` (N,).
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
    if "ood_score" in schema.names:
        scores = np.asarray(outputs["ood_score"], dtype=np.float32).reshape(-1)[order]
        columns.append(pa.array(scores, pa.float32(), mask=~np.isfinite(scores)))  # non-finite outputs: null
        columns.append(pa.array(np.asarray(outputs["unknown"], dtype=bool).reshape(-1)[order], pa.bool_()))
    return pa.Table.from_arrays(columns, schema=schema)
