"""Fit the run's out-of-distribution detector (models/ood.py) on the final model's validation outputs.

Called once by the trainer, after the best weights are loaded and the temperature is folded in (the model
that is exported), so the detector sees exactly the logits and embeddings the artifact will produce: one
fp32 pass over the validation split with autocast off. The detector is saved in the run folder (`RunDir`:
`ood.json`, `ood.npz`), where export and re-export find it.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from models.network import TransferNet
from models.ood import OODDetector, OODError
from training.config import TrainConfig
from training.run_dir import RunDir


@torch.no_grad()
def collect_outputs(model: TransferNet, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 logits (N, C), embeddings (N, D) and targets (N,) of every (images, targets) batch of `loader` (a
    DataLoader, or the trainer's cached batches), without autocast."""
    model.eval()
    logits, embeddings, targets = [], [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=False):
            batch_logits, batch_embeddings = model(images)
        logits.append(batch_logits.float().cpu().numpy())
        embeddings.append(batch_embeddings.float().cpu().numpy())
        targets.append(target.numpy())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(embeddings), np.concatenate(targets).astype(np.int64)


def fit_run_ood(
    config: TrainConfig, run: RunDir, model: TransferNet, val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> OODDetector | None:
    """Fit `config.ood_method` on the validation split and save it in `run` (or remove a stale one for 'none').

    A validation split the method cannot fit on (fewer than 2 images; mahalanobis without 2 images of every
    class) does not fail the run: it is reported and the run gets no detector, like `--ood-method none`."""
    if config.ood_method == "none":
        run.save_ood(None)
        return None
    logits, embeddings, targets = collect_outputs(model, val_loader, device)
    try:
        detector = OODDetector.fit(
            config.ood_method, logits, embeddings, targets, config.ood_target_rejection, seed=config.seed
        )
    except OODError as exc:
        tqdm.write(f"warning: no out-of-distribution detector for this run: {exc}")
        run.save_ood(None)
        return None
    run.save_ood(detector)
    return detector
