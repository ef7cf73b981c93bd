"""Embeddings for the audit, computed by extraction's engine (`extraction.job.run_extraction`: decoding workers,
batched inference, progress bar, resume, `--engine ray` for large sets), not by a second pipeline.

With a trained artifact the audit uses it as it is. Without one it uses the default ImageNet backbone,
exported once as an embedding-only artifact (TorchScript + ONNX with a placeholder 2-class head whose
outputs the audit ignores) into a folder that later audits reuse."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from extraction.config import EngineName, ExtractionConfig
from extraction.job import run_extraction
from models.artifact import ArtifactError, load_artifact
from models.registry import get_spec

PLACEHOLDER_LABELS = ["embedding-only-0", "embedding-only-1"]


@dataclass(frozen=True)
class Embeddings:
    unit: np.ndarray  # (N, D) float32, L2-normalised, in the order of the paths asked for
    ood_scores: np.ndarray | None  # (N,) the artifact's OOD score, when it has a detector


def embedder_artifact(folder: Path, backbone: str, image_size: int | None) -> Path:
    """The default backbone's ImageNet weights as an embedding-only artifact in `folder` (exported when absent
    or for another backbone/size; ~20 s on 2 cores)."""
    import torch

    from models.network import build_network
    from training.export import export_artifact

    preprocessing = get_spec(backbone).preprocessing
    preprocessing = preprocessing.with_image_size(image_size or preprocessing.image_size)
    if folder.exists():
        try:
            manifest = load_artifact(folder).manifest
            if manifest.backbone == backbone and manifest.preprocessing == preprocessing:
                return folder
        except ArtifactError:
            pass
        raise FileExistsError(f"{folder} holds another embedder; delete it or choose another output folder")
    generator = torch.Generator().manual_seed(0)
    size = preprocessing.image_size
    export_artifact(
        build_network(backbone, len(PLACEHOLDER_LABELS), weights="imagenet"),
        labels=PLACEHOLDER_LABELS, backbone=backbone, preprocessing=preprocessing,
        parity_batch=torch.randn((4, 3, size, size), generator=generator), output=folder,
        name=f"{backbone}-imagenet-embedder", metrics={},
    )
    return folder


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
        raise ArtifactError(f"extraction produced no embedding for {len(missing)} images, e.g. {missing[0]}")
    order = np.array([row[p] for p in absolute])
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)[order]
    vectors = vectors.astype(np.float32)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    ood = None
    if "ood_score" in table.schema.names:
        ood = np.asarray(table.column("ood_score").to_numpy(zero_copy_only=False), dtype=np.float64)[order]
    return Embeddings(unit, ood)
