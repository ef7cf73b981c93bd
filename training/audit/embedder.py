"""Without `--artifact`, the audit embeds with the default backbone's ImageNet weights, exported once as an
embedding-only artifact (TorchScript + ONNX with a placeholder 2-class head whose outputs the audit ignores)
so that extraction's engine can run it like any artifact; later audits reuse the folder."""

from __future__ import annotations

from pathlib import Path

from models.artifact import ArtifactError, load_artifact
from models.registry import get_spec

PLACEHOLDER_LABELS = ["embedding-only-0", "embedding-only-1"]


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
