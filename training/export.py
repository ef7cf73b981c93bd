"""Export a fine-tuned TransferNet to one artifact: TorchScript + ONNX + manifest, with proven parity.

The artifact is written to a temporary sibling directory and renamed into place only after the parity
check passes, so a failed export never leaves a half-written artifact behind. `export_run` exports a
finished training run (its `model.pt`, labels, preprocessing and test metrics).
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from models.artifact import (
    FORMAT_VERSION,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    Artifact,
    Manifest,
    ParityReport,
    load_artifact,
    sha256_file,
    write_manifest,
)
from models.network import TransferNet, build_network
from models.ood import OODDetector, OODError, OODSummary
from models.preprocessing import Preprocessing, eval_transform
from training.data import ImageDataset
from training.run_dir import RunDir

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
PARITY_IMAGES = 16
"""Test images a run's export checks parity on."""
PARITY_TOLERANCE = 1e-4
"""Allowed max |logit difference| per unit of logit scale: 1e-4 for logits within [-1, 1], proportionally
more for larger logits, since fp32 rounding error grows with the magnitude of what is rounded."""


class ParityError(RuntimeError):
    """An exported form does not reproduce the eager model within tolerance."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "format": str(FORMAT_VERSION)}
    for package in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def export_torchscript(model: TransferNet, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))


def export_onnx(model: TransferNet, example: torch.Tensor, path: Path, opset: int = ONNX_OPSET) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["images"],
            output_names=["logits", "embedding"],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def check_parity(
    model: TransferNet, torchscript_path: Path, onnx_path: Path, batch: torch.Tensor, tolerance: float = PARITY_TOLERANCE
) -> ParityReport:
    """Compare TorchScript and ONNX Runtime outputs with the eager model on `batch`; raise ParityError on mismatch."""
    import onnxruntime as ort

    model = model.eval().cpu()
    with torch.no_grad():
        eager_logits, eager_embedding = (t.numpy() for t in model(batch))
        scripted = torch.jit.load(str(torchscript_path), map_location="cpu").eval()
        ts_logits, ts_embedding = (t.numpy() for t in scripted(batch))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_embedding = session.run(None, {session.get_inputs()[0].name: batch.numpy()})

    eager_top1 = eager_logits.argmax(1)
    agree = (ts_logits.argmax(1) == eager_top1) & (onnx_logits.argmax(1) == eager_top1)
    report = ParityReport(
        images=len(batch),
        torchscript_max_abs_logits=float(np.abs(ts_logits - eager_logits).max()),
        torchscript_max_abs_embedding=float(np.abs(ts_embedding - eager_embedding).max()),
        onnx_max_abs_logits=float(np.abs(onnx_logits - eager_logits).max()),
        onnx_max_abs_embedding=float(np.abs(onnx_embedding - eager_embedding).max()),
        top1_agreement=float(agree.mean()),
        tolerance=tolerance,
        logit_scale=float(max(1.0, np.abs(eager_logits).max())),
    )
    worst = max(report.torchscript_max_abs_logits, report.onnx_max_abs_logits)
    if worst > report.allowed_max_abs_logits or report.top1_agreement < 1.0:
        raise ParityError(
            f"exported model disagrees with the eager model: max |logit difference| "
            f"TorchScript {report.torchscript_max_abs_logits:.2e}, ONNX {report.onnx_max_abs_logits:.2e} "
            f"(allowed {report.allowed_max_abs_logits:.2e}); top-1 agreement {report.top1_agreement:.3f}"
        )
    return report


def export_artifact(
    model: TransferNet,
    *,
    labels: list[str],
    backbone: str,
    preprocessing: Preprocessing,
    parity_batch: torch.Tensor,
    output: Path,
    name: str,
    version: str | None = None,
    metrics: dict[str, float] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    ood: OODSummary | None = None,
    ood_source: Path | None = None,
) -> Artifact:
    """Write TorchScript, ONNX and manifest to `output` (which must not exist) after checking parity.

    `ood`: the run's out-of-distribution detector summary; its file (if any) is copied from `ood_source` (the
    run folder), hashed into `manifest.files` like the model files, and checked to load for this network."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"artifact directory already exists: {output}")
    if len(labels) != model.head[-1].out_features:
        raise ValueError(f"{len(labels)} labels for a head with {model.head[-1].out_features} outputs")
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    parity_batch = parity_batch.float().cpu().contiguous()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        export_torchscript(model, parity_batch[:1], staging / TORCHSCRIPT_FILE)
        export_onnx(model, parity_batch[:2] if len(parity_batch) > 1 else parity_batch, staging / ONNX_FILE)
        parity = check_parity(model, staging / TORCHSCRIPT_FILE, staging / ONNX_FILE, parity_batch, tolerance)
        files = [TORCHSCRIPT_FILE, ONNX_FILE] + _copy_ood(ood, ood_source, staging, len(labels), model)
        manifest = Manifest(
            name=name,
            version=version or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
            backbone=backbone,
            labels=labels,
            preprocessing=preprocessing,
            embedding_dim=model.backbone.embedding_dim,
            metrics=metrics or {},
            parity=parity,
            onnx_opset=ONNX_OPSET,
            files={f: sha256_file(staging / f) for f in files},
            library_versions=library_versions(),
            ood=ood,
        )
        write_manifest(staging, manifest)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s (parity: %s)", output, parity)
    return load_artifact(output)


def _copy_ood(ood: OODSummary | None, source: Path | None, staging: Path, num_classes: int, model: TransferNet) -> list[str]:
    """Copy the detector's file into the staging artifact; the file names to hash. Refuses a detector that does
    not belong to this network or does not load."""
    if ood is None:
        return []
    if (ood.num_classes, ood.embedding_dim) != (num_classes, model.backbone.embedding_dim):
        raise ValueError(
            f"the OOD detector was fitted on {ood.num_classes} classes and {ood.embedding_dim}-d embeddings, "
            f"not this model's {num_classes} and {model.backbone.embedding_dim}"
        )
    if ood.file is None:
        return []
    if source is None:
        raise ValueError(f"the OOD detector's file {ood.file} needs a source folder to copy it from")
    shutil.copyfile(Path(source) / ood.file, staging / ood.file)
    try:
        OODDetector.load(staging, ood)
    except OODError as exc:
        raise ValueError(f"the run's OOD detector cannot be exported: {exc}") from None
    return [ood.file]


def export_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Export a run's final weights (`model.pt`) with its labels, preprocessing, held-out metrics (`test_*`, or
    `val_*` when the run had no test split, with the image count and 95% interval) and OOD detector (if the run
    fitted one); parity on test images (or validation, or training images when there are none)."""
    run = RunDir(run_dir)
    run.require_finished()
    checkpoint = run.load_checkpoint()
    config = checkpoint.config
    preprocessing = config.preprocessing()
    selection = checkpoint.state.selection
    model = build_network(config.backbone, len(checkpoint.labels), weights="none", dropout=config.dropout,
                          head_input=selection.head_input if selection is not None else "embedding")
    model.load_state_dict(run.load_final_weights())
    splits = run.load_splits()
    parity_records = (splits.test or splits.val or splits.train)[:PARITY_IMAGES]
    test_set = ImageDataset(parity_records, checkpoint.labels, eval_transform(preprocessing), preprocessing)
    test = run.load_test_report()
    prefix = "test_" if test.source == "test" else "val_"
    estimate = {f"{prefix}{k}": v for k, v in test.headline().items()} | {f"{prefix}images": float(test.images)}
    if test.source == "none":  # no held-out image at all: nothing to claim
        estimate = {"held_out_images": 0.0}
    elif test.accuracy_ci95 is not None:
        estimate |= {f"{prefix}accuracy_ci95_low": test.accuracy_ci95[0], f"{prefix}accuracy_ci95_high": test.accuracy_ci95[1]}
    output = Path(output) if output else run.artifact
    export_artifact(
        model,
        labels=checkpoint.labels,
        backbone=config.backbone,
        preprocessing=preprocessing,
        parity_batch=torch.stack([test_set[i][0] for i in range(len(test_set))]),
        output=output,
        name=config.name or Path(config.data).stem,
        metrics=estimate | {"best_val_accuracy": max((h.val_accuracy for h in checkpoint.state.history), default=0.0)},
        ood=run.load_ood_summary(),
        ood_source=run.root,
    )
    return output
