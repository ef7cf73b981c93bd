"""Embeddings of a list of image files as arrays, computed by this job (`run_extraction`: decoding workers,
batched inference, progress bar, resume, `engine="ray"` for large sets): what `transfer-serve audit` uses,
so there is one embedding pipeline, not two. The caller has already decoded every path once (unreadable
files are its findings), so a path without a row is an error here."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from extraction.config import EngineName, ExtractionConfig, ExtractionError
from extraction.job import run_extraction


@dataclass(frozen=True)
class Embeddings:
    unit: np.ndarray  # (N, D) float32, L2-normalised, in the order of the paths asked for
    ood_scores: np.ndarray | None  # (N,) the artifact's OOD score, when it has a detector


def embed_paths(
    paths: Sequence[Path], artifact: Path, work: Path, engine: EngineName = "local", show_progress: bool = True
) -> Embeddings:
    """Embed `paths` (all decodable) with `artifact` through the extraction job writing to `work`."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "inputs.csv"
    absolute = [str(Path(p).resolve()) for p in paths]
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"])
        writer.writerows([p] for p in sorted(set(absolute)))
    output = work / "extraction"
    run_extraction(ExtractionConfig(artifact=artifact, input=manifest, output=output, engine=engine,
                                    show_progress=show_progress, workers=1))
    table = pq.read_table(output)
    row = {path: i for i, path in enumerate(table.column("path").to_pylist())}
    missing = [p for p in absolute if p not in row]
    if missing:
        raise ExtractionError(f"extraction produced no embedding for {len(missing)} images, e.g. {missing[0]}")
    order = np.array([row[p] for p in absolute])
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)[order]
    vectors = vectors.astype(np.float32)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    ood = None
    if "ood_score" in table.schema.names:
        ood = np.asarray(table.column("ood_score").to_numpy(zero_copy_only=False), dtype=np.float64)[order]
    return Embeddings(unit, ood)
