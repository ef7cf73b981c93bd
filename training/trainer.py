"""The fine-tuning loop: data -> TransferNet -> epochs with early stopping -> calibration and test -> artifact.

`train` runs the steps below in order; what each writes to the run folder, and how a resumed run reads it
back, is `training.run_dir.RunDir`'s.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.network import TransferNet, build_network
from models.preprocessing import eval_transform, train_transform
from models.runtimes import resolve_device
from training.calibration import fit_temperature, fold_temperature
from training.config import TrainConfig
from training.data import (
    DataError,
    ImageDataset,
    ImageRecord,
    SkippedImage,
    Splits,
    discover_images,
    scan_readable,
    split_records,
)
from training.evaluate import EvaluationReport, evaluate_predictions
from training.export import export_run
from training.ood_fit import fit_run_ood
from training.run_dir import Checkpoint, EpochRecord, RunDir
from training.strategies import enter_train_mode, group_learning_rates, set_trainable, trainable_group_count


class TrainResult(BaseModel):
    run_dir: Path
    best_epoch: int
    history: list[EpochRecord]
    test: EvaluationReport
    skipped: list[SkippedImage]
    artifact: Path | None


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


def open_run_dir(config: TrainConfig) -> RunDir:
    """The run folder of `config`, created; refuses to overwrite a run, or to resume one that is not there."""
    run = RunDir(config.output)
    if run.holds_run() and not config.resume:
        raise DataError(f"{run.root} already holds a training run; pass --resume to continue it, or choose another --output")
    if config.resume and not run.holds_run():
        raise DataError(f"--resume: no checkpoint in {run.root}")
    run.create()
    return run


def prepare_splits(config: TrainConfig, run: RunDir) -> tuple[Splits, list[SkippedImage]]:
    """Discover, scan and split the data once; a resumed run reads the saved split instead."""
    if config.resume and run.splits.exists():
        return run.load_splits(), run.load_skipped()
    records = discover_images(config.data)
    good, skipped = scan_readable(records, workers=max(2, config.workers), preprocessing=config.preprocessing())
    for item in skipped:
        tqdm.write(f"skipped unreadable image {item.path}: {item.reason}")
    if not good:
        raise DataError(f"{config.data}: none of the {len(records)} images could be read")
    splits = split_records(good, config.val_fraction, config.test_fraction, config.seed)
    run.save_splits(splits, skipped)
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


@dataclass
class TrainingSetup:
    """What the epochs train and are measured on."""

    labels: list[str]
    model: TransferNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    train_set: ImageDataset
    val_set: ImageDataset
    test_set: ImageDataset
    device: torch.device


@dataclass
class EpochProgress:
    """Where the epoch loop stands: what a checkpoint saves and a resumed run starts from."""

    history: list[EpochRecord] = field(default_factory=list)
    next_epoch: int = 0
    best_epoch: int = -1
    best_key: tuple[float, float] = (-1.0, 0.0)

    @property
    def epochs_without_improvement(self) -> int:
        return self.next_epoch - 1 - self.best_epoch if self.history else 0


def build_model_and_optimizer(config: TrainConfig, splits: Splits, device: torch.device) -> TrainingSetup:
    """The network (seeded; no pretrained weights when resuming), datasets, optimizer, schedule and loss."""
    labels = splits.labels()
    preprocessing = config.preprocessing()
    torch.manual_seed(config.seed)
    weights = "none" if config.resume else config.weights
    model = build_network(config.backbone, len(labels), weights=weights, dropout=config.dropout)
    model = model.to(device).to(memory_format=torch.channels_last)
    train_set = ImageDataset(splits.train, labels, train_transform(preprocessing, config.horizontal_flip), preprocessing)
    val_set = ImageDataset(splits.val, labels, eval_transform(preprocessing), preprocessing)
    test_set = ImageDataset(splits.test, labels, eval_transform(preprocessing), preprocessing)
    steps_per_epoch = len(_loader(train_set, config, shuffle=True, seed=0))
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch)
    loss_weights = class_weights(splits.train, labels).to(device) if config.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)
    return TrainingSetup(labels, model, optimizer, scheduler, criterion, train_set, val_set, test_set, device)


def resume_from_checkpoint(config: TrainConfig, run: RunDir, setup: TrainingSetup) -> EpochProgress:
    """Load the last checkpoint's model, optimizer and schedule into `setup`; where its epochs stopped."""
    checkpoint = run.load_checkpoint(setup.device)
    if checkpoint.labels != setup.labels or checkpoint.backbone != config.backbone:
        raise DataError(f"{run.checkpoint} was trained on other labels or another backbone; it cannot be resumed here")
    setup.model.load_state_dict(checkpoint.model)
    setup.optimizer.load_state_dict(checkpoint.optimizer)
    setup.scheduler.load_state_dict(checkpoint.scheduler)
    return EpochProgress(checkpoint.history, checkpoint.epoch + 1, checkpoint.best_epoch, checkpoint.best_key)


def train_one_epoch(config: TrainConfig, setup: TrainingSetup, epoch: int, show_progress: bool) -> tuple[float, float, int]:
    """One pass over the training split: (mean loss, accuracy, images seen)."""
    model, device = setup.model, setup.device
    loader = _loader(setup.train_set, config, shuffle=True, seed=config.seed * 1000 + epoch)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_progress, leave=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device):
            logits, _ = model(images)
            loss = setup.criterion(logits.float(), targets)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        loss_sum += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    return loss_sum / max(1, seen), correct / max(1, seen), seen


def run_epochs(
    config: TrainConfig, run: RunDir, setup: TrainingSetup, progress: EpochProgress, show_progress: bool
) -> EpochProgress:
    """Train and validate epoch by epoch until `config.epochs` or early stopping; checkpoint after each."""
    groups = setup.model.layer_groups()
    epochs_without_improvement = progress.epochs_without_improvement
    for epoch in range(progress.next_epoch, config.epochs):
        if epochs_without_improvement >= config.patience:
            break
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1000 + epoch)
        count = trainable_group_count(config.strategy, epoch, config.epochs, len(groups))
        set_trainable(groups, count)
        enter_train_mode(setup.model, groups)
        train_loss, train_accuracy, seen = train_one_epoch(config, setup, epoch, show_progress)
        train_seconds = time.perf_counter() - started

        val_logits, val_targets = predict_loader(setup.model, _loader(setup.val_set, config, False, 0), setup.device)
        val = evaluate_predictions(_probabilities(val_logits), val_targets.numpy(), setup.labels)
        val_loss = float(nn.functional.cross_entropy(val_logits, val_targets))
        record = EpochRecord(
            epoch=epoch,
            trainable_groups=count,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            val_loss=val_loss,
            val_accuracy=val.accuracy,
            val_macro_f1=val.macro_f1,
            seconds=time.perf_counter() - started,
            train_images_per_second=seen / train_seconds,
        )
        progress.history.append(record)
        progress.next_epoch = epoch + 1
        if show_progress:
            tqdm.write(
                f"epoch {epoch + 1}: val accuracy {val.accuracy:.4f}, macro-F1 {val.macro_f1:.4f}, "
                f"val loss {val_loss:.4f} ({record.train_images_per_second:.0f} img/s)"
            )
        key = (val.accuracy, -val_loss)
        if key > progress.best_key:
            progress.best_key, progress.best_epoch, epochs_without_improvement = key, epoch, 0
            run.save_best_weights(setup.model.state_dict())
        else:
            epochs_without_improvement += 1
        run.save_checkpoint(
            Checkpoint(
                model=setup.model.state_dict(),
                optimizer=setup.optimizer.state_dict(),
                scheduler=setup.scheduler.state_dict(),
                epoch=epoch,
                best_epoch=progress.best_epoch,
                best_key=progress.best_key,
                history=progress.history,
                labels=setup.labels,
                backbone=config.backbone,
                config=config,
            )
        )
    return progress


def calibrate_and_test(config: TrainConfig, run: RunDir, setup: TrainingSetup) -> EvaluationReport:
    """Best weights, temperature fitted on validation and folded in (`model.pt`), the OOD detector fitted on
    validation outputs of that final model (`training.ood_fit`), then the held-out test."""
    model, device = setup.model, setup.device
    model.load_state_dict(run.load_best_weights(device))
    val_logits, val_targets = predict_loader(model, _loader(setup.val_set, config, False, 0), device)
    temperature = fit_temperature(val_logits, val_targets)
    fold_temperature(model, temperature)
    run.save_final_weights(model.state_dict())
    run.save_calibration(temperature)
    fit_run_ood(config, run, model, _loader(setup.val_set, config, False, 0), device)  # on the final model, fp32

    test_logits, test_targets = predict_loader(model, _loader(setup.test_set, config, False, 0), device)
    test = evaluate_predictions(_probabilities(test_logits), test_targets.numpy(), setup.labels)
    run.save_test_report(test)
    return test


def export_if_requested(config: TrainConfig, run: RunDir) -> Path | None:
    """The run's artifact (exported now unless an earlier attempt of this run already did), or None."""
    if not config.export:
        return None
    if not run.artifact.exists():
        export_run(run.root, run.artifact)
    return run.artifact


def train(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    run = open_run_dir(config)
    device = torch.device(resolve_device(config.device))
    splits, skipped = prepare_splits(config, run)
    setup = build_model_and_optimizer(config, splits, device)
    progress = resume_from_checkpoint(config, run, setup) if config.resume else EpochProgress()
    progress = run_epochs(config, run, setup, progress, show_progress)
    run.save_history(progress.history)
    test = calibrate_and_test(config, run, setup)
    artifact = export_if_requested(config, run)
    return TrainResult(
        run_dir=run.root, best_epoch=progress.best_epoch, history=progress.history, test=test, skipped=skipped,
        artifact=artifact,
    )
