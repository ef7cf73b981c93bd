"""The fine-tuning loop: data -> TransferNet -> epochs with early stopping -> test metrics -> artifact.

A run directory holds everything a run produces, so an interrupted run resumes from it:
`splits.csv` (the exact train/val/test split), `skipped.json` (unreadable images and why),
`checkpoint.pt` (last epoch: model, optimizer, scheduler, history), `best.pt` (best validation weights),
`model.pt` (best weights with the fitted softmax temperature folded in: what is tested and exported),
`calibration.json`, `history.json`, `test_report.json`, `confusion_matrix.png` and the exported `artifact/`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.network import TransferNet, build_network
from models.preprocessing import eval_transform, train_transform
from models.runtimes import resolve_device
from training.config import TrainConfig
from training.data import (
    DataError,
    ImageDataset,
    ImageRecord,
    SkippedImage,
    Splits,
    discover_images,
    read_csv_manifest,
    scan_readable,
    split_records,
    write_csv_manifest,
)
from training.calibration import fit_temperature, fold_temperature
from training.evaluate import EvaluationReport, evaluate_predictions, save_confusion_matrix_png
from training.export import export_artifact
from training.strategies import enter_train_mode, group_learning_rates, set_trainable, trainable_group_count

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
FINAL_FILE = "model.pt"
SPLITS_FILE = "splits.csv"
ARTIFACT_DIR = "artifact"
PARITY_IMAGES = 16


class EpochRecord(BaseModel):
    epoch: int
    trainable_groups: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    train_images_per_second: float


class TrainResult(BaseModel):
    run_dir: Path
    best_epoch: int
    history: list[EpochRecord]
    test: EvaluationReport
    skipped: list[SkippedImage]
    artifact: Path | None


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: TransferNet, config: TrainConfig, steps_per_epoch: int):
    groups = model.layer_groups()
    rates = group_learning_rates(len(groups), config.lr, config.strategy, config.lr_spread)
    param_groups = [
        {"params": [p for module in group for p in module.parameters()], "lr": lr}
        for group, lr in zip(groups, rates)
    ]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    total = steps_per_epoch * config.epochs
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rates, total_steps=total)
    else:
        warmup = min(steps_per_epoch, max(1, total // 10))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total, warmup))
    return optimizer, scheduler


def class_weights(train: list[ImageRecord], labels: list[str]) -> torch.Tensor:
    counts = Counter(r.label for r in train)
    total = sum(counts.values())
    return torch.tensor([total / (len(labels) * max(1, counts[label])) for label in labels], dtype=torch.float32)


def prepare_splits(config: TrainConfig, run_dir: Path) -> tuple[Splits, list[SkippedImage]]:
    """Discover, scan and split the data once; a resumed run reads the saved split instead."""
    splits_path = run_dir / SPLITS_FILE
    skipped_path = run_dir / "skipped.json"
    if config.resume and splits_path.exists():
        records = read_csv_manifest(splits_path)
        skipped = [SkippedImage.model_validate(s) for s in json.loads(skipped_path.read_text())]
        return split_records(records), skipped
    records = discover_images(config.data)
    good, skipped = scan_readable(records, workers=max(2, config.workers))
    for item in skipped:
        tqdm.write(f"skipped unreadable image {item.path}: {item.reason}")
    if not good:
        raise DataError(f"{config.data}: none of the {len(records)} images could be read")
    splits = split_records(good, config.val_fraction, config.test_fraction, config.seed)
    write_csv_manifest(splits.records(), splits_path)
    skipped_path.write_text(json.dumps([s.model_dump(mode="json") for s in skipped], indent=2))
    return splits, skipped


def _loader(dataset: ImageDataset, config: TrainConfig, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=shuffle and len(dataset) > config.batch_size,
    )


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_loader(model: TransferNet, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on CPU) and targets for every item of `loader`."""
    model.eval()
    all_logits, targets = [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits, _ = model(images)
        all_logits.append(logits.float().cpu())
        targets.append(target)
    return torch.cat(all_logits), torch.cat(targets)


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return logits.softmax(1).numpy()


def train(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    run_dir = Path(config.output)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if checkpoint_path.exists() and not config.resume:
        raise DataError(f"{run_dir} already holds a training run; pass --resume to continue it, or choose another --output")
    if config.resume and not checkpoint_path.exists():
        raise DataError(f"--resume: no checkpoint in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(resolve_device(config.device))

    splits, skipped = prepare_splits(config, run_dir)
    labels = splits.labels()
    preprocessing = config.preprocessing()

    torch.manual_seed(config.seed)
    model = build_network(config.backbone, len(labels), weights="none" if config.resume else config.weights, dropout=config.dropout)
    model = model.to(device).to(memory_format=torch.channels_last)
    groups = model.layer_groups()

    train_set = ImageDataset(splits.train, labels, train_transform(preprocessing, config.horizontal_flip))
    val_set = ImageDataset(splits.val, labels, eval_transform(preprocessing))
    test_set = ImageDataset(splits.test, labels, eval_transform(preprocessing))
    steps_per_epoch = len(_loader(train_set, config, shuffle=True, seed=0))
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch)
    weights = class_weights(splits.train, labels).to(device) if config.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)

    history: list[EpochRecord] = []
    start_epoch, best_epoch, best_key = 0, -1, (-1.0, 0.0)
    if config.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["labels"] != labels or state["backbone"] != config.backbone:
            raise DataError(f"{checkpoint_path} was trained on other labels or another backbone; it cannot be resumed here")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = [EpochRecord.model_validate(h) for h in state["history"]]
        start_epoch, best_epoch = state["epoch"] + 1, state["best_epoch"]
        best_key = tuple(state["best_key"])

    epochs_without_improvement = start_epoch - 1 - best_epoch if history else 0
    for epoch in range(start_epoch, config.epochs):
        if epochs_without_improvement >= config.patience:
            break
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1000 + epoch)
        count = trainable_group_count(config.strategy, epoch, config.epochs, len(groups))
        set_trainable(groups, count)
        enter_train_mode(model, groups)
        loader = _loader(train_set, config, shuffle=True, seed=config.seed * 1000 + epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_progress, leave=True)
        for images, targets in bar:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with _autocast(device):
                logits, _ = model(images)
                loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        train_seconds = time.perf_counter() - started

        val_logits, val_targets = predict_loader(model, _loader(val_set, config, False, 0), device)
        val = evaluate_predictions(_probabilities(val_logits), val_targets.numpy(), labels)
        val_loss = float(nn.functional.cross_entropy(val_logits, val_targets))
        record = EpochRecord(
            epoch=epoch,
            trainable_groups=count,
            train_loss=loss_sum / max(1, seen),
            train_accuracy=correct / max(1, seen),
            val_loss=val_loss,
            val_accuracy=val.accuracy,
            val_macro_f1=val.macro_f1,
            seconds=time.perf_counter() - started,
            train_images_per_second=seen / train_seconds,
        )
        history.append(record)
        if show_progress:
            tqdm.write(
                f"epoch {epoch + 1}: val accuracy {val.accuracy:.4f}, macro-F1 {val.macro_f1:.4f}, "
                f"val loss {val_loss:.4f} ({record.train_images_per_second:.0f} img/s)"
            )
        key = (val.accuracy, -val_loss)
        if key > best_key:
            best_key, best_epoch, epochs_without_improvement = key, epoch, 0
            _atomic_save(model.state_dict(), run_dir / BEST_FILE)
        else:
            epochs_without_improvement += 1
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_epoch": best_epoch,
                "best_key": list(best_key),
                "history": [h.model_dump() for h in history],
                "labels": labels,
                "backbone": config.backbone,
                "config": config.model_dump(mode="json"),
            },
            checkpoint_path,
        )
    (run_dir / "history.json").write_text(json.dumps([h.model_dump() for h in history], indent=2))

    model.load_state_dict(torch.load(run_dir / BEST_FILE, map_location=device, weights_only=True))
    val_logits, val_targets = predict_loader(model, _loader(val_set, config, False, 0), device)
    temperature = fit_temperature(val_logits, val_targets)
    fold_temperature(model, temperature)
    _atomic_save(model.state_dict(), run_dir / FINAL_FILE)
    (run_dir / "calibration.json").write_text(json.dumps({"temperature": temperature}, indent=2))

    test_logits, test_targets = predict_loader(model, _loader(test_set, config, False, 0), device)
    test = evaluate_predictions(_probabilities(test_logits), test_targets.numpy(), labels)
    (run_dir / "test_report.json").write_text(test.model_dump_json(indent=2))
    save_confusion_matrix_png(test, run_dir / "confusion_matrix.png")

    artifact_path = None
    if config.export:
        artifact_path = run_dir / ARTIFACT_DIR
        if not artifact_path.exists():
            export_run(run_dir, artifact_path)
    return TrainResult(
        run_dir=run_dir, best_epoch=best_epoch, history=history, test=test, skipped=skipped, artifact=artifact_path
    )


def export_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Export a run's best weights with its labels, preprocessing and test metrics; parity on test images."""
    run_dir = Path(run_dir)
    for required in (CHECKPOINT_FILE, FINAL_FILE, SPLITS_FILE, "test_report.json"):
        if not (run_dir / required).exists():
            raise DataError(f"{run_dir} is not a finished training run: {required} is missing")
    state = torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    config = TrainConfig.model_validate(state["config"])
    labels = state["labels"]
    preprocessing = config.preprocessing()
    model = build_network(config.backbone, len(labels), weights="none", dropout=config.dropout)
    model.load_state_dict(torch.load(run_dir / FINAL_FILE, map_location="cpu", weights_only=True))
    test_records = split_records(read_csv_manifest(run_dir / SPLITS_FILE)).test
    test_set = ImageDataset(test_records[:PARITY_IMAGES], labels, eval_transform(preprocessing))
    test = EvaluationReport.model_validate_json((run_dir / "test_report.json").read_text())
    history = [EpochRecord.model_validate(h) for h in state["history"]]
    output = Path(output) if output else run_dir / ARTIFACT_DIR
    export_artifact(
        model,
        labels=labels,
        backbone=config.backbone,
        preprocessing=preprocessing,
        parity_batch=torch.stack([test_set[i][0] for i in range(len(test_set))]),
        output=output,
        name=config.name or Path(config.data).stem,
        metrics={f"test_{k}": v for k, v in test.headline().items()}
        | {"best_val_accuracy": max(h.val_accuracy for h in history)},
    )
    return output
