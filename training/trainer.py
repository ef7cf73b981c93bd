"""The fine-tuning loop: data -> plan -> selection run (validated every N steps) -> refit on train+val ->
calibration and an honest estimate -> artifact.

`train` runs the steps below in order; what each writes to the run folder, and how a resumed run reads it
back, is `training.run_dir.RunDir`'s.

- The schedule is a budget in optimizer steps sized by the data (`TrainConfig.budget_steps`), fitted into
  `--time-budget` from a measured speed probe (`plan_run`): lower training resolution first, then fewer steps.
- The selection run trains on the train split and validates every `eval_every` steps; the best step (by
  validation accuracy, then loss) is the step count. With `refit` (default) a fresh model then trains on
  train+val for that many steps, scaled to the larger set, and that model is exported: no label is spent
  on model selection alone.
- Training images are decoded once, through `models.decoding.load_image` with the serving preprocessing,
  and cached in memory as uint8 at ~1.15x the training crop; validation and test images are cached at the
  serving size. Augmentation (random resized crop, flip, optional TrivialAugment) runs on the cache.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Iterator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from models.network import TransferNet, build_network
from models.preprocessing import Preprocessing
from models.inference import resolve_device
from training.calibration import fit_temperature, fold_temperature
from training.config import TrainConfig
from training.data import (
    DataError,
    ImageDataset,
    ImageRecord,
    SkippedImage,
    Splits,
    decode_to_cache,
    discover_images,
    scan_readable,
    split_records,
)
from training.audit.checks import warn_before_training
from training.evaluate import EvaluationReport, evaluate_predictions
from training.html_report import write_evaluation_html
from training.export import export_run
from training.ood_fit import fit_run_ood
from training.run_dir import Checkpoint, EpochRecord, RunDir, RunPlan
from training.strategies import enter_train_mode, group_learning_rates, set_trainable, trainable_group_count

CACHE_MARGIN = 1.15
"""Training images are cached at this many times the training crop side (random resized crops are cut from it)."""
EXPORT_OVERHEAD_SECONDS = 30.0
"""What a plan reserves for calibration, export (TorchScript + ONNX) and the parity check on a CPU."""
PROBE_STEPS = 3
"""Timed steps of the speed probe (after one warm-up step); the fastest counts: on a shared CPU the others
measure the neighbours."""
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class TrainResult(BaseModel):
    run_dir: Path
    best_epoch: int
    """Index of the best validation of the selection run."""
    best_step: int = 0
    refit_steps: int = 0
    """Steps of the refit on train+val (0: no refit; the best selection weights were exported)."""
    history: list[EpochRecord]
    test: EvaluationReport
    """The held-out test report, or (no test split) the selection run's validation report, `source` says which."""
    skipped: list[SkippedImage]
    artifact: Path | None
    plan: RunPlan | None = None


def _cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: TransferNet, config: TrainConfig, total_steps: int):
    """Optimizer (weight decay on weights only, not on norms and biases) and a schedule over `total_steps`."""
    groups = model.layer_groups()
    rates = group_learning_rates(len(groups), config.lr, config.strategy, config.lr_spread)
    param_groups = []
    for group, lr in zip(groups, rates):
        params = [p for module in group for p in module.parameters()]
        param_groups += [
            {"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
        ]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(param_groups)
    if config.schedule == "onecycle":
        max_lr = [g["lr"] for g in param_groups]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(2, total_steps))
    else:
        warmup = max(1, round(config.warmup_fraction * total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total_steps, warmup))
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


# --- cached images ---------------------------------------------------------------------------------------------


@dataclass
class CachedImages:
    """Images decoded once: uint8 (N, 3, side, side) and their class indices."""

    images: torch.Tensor
    targets: torch.Tensor
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def build(cls, records: list[ImageRecord], labels: list[str], preprocessing: Preprocessing, side: int,
              workers: int) -> "CachedImages":
        index = {label: i for i, label in enumerate(labels)}
        images = decode_to_cache(records, preprocessing, side, workers)
        return cls(images, torch.tensor([index[r.label] for r in records], dtype=torch.long), list(records))

    @classmethod
    def concat(cls, parts: list["CachedImages"]) -> "CachedImages":
        return cls(torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]),
                   [r for p in parts for r in p.records])


def cached_batches(
    cached: CachedImages, preprocessing: Preprocessing, batch_size: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float32 images, targets) batches of the cached images, in order."""
    for start in range(0, len(cached), batch_size):
        yield normalize_batch(cached.images[start : start + batch_size], preprocessing), cached.targets[start : start + batch_size]


def normalize_batch(images: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """uint8 NCHW -> the float32 values of `models.preprocessing.normalized_chw` (same operations, same order)."""
    out = images.float().mul_(np.float32(1 / 255))
    out -= torch.tensor(p.mean, dtype=torch.float32).view(1, 3, 1, 1)
    out /= torch.tensor(p.std, dtype=torch.float32).view(1, 3, 1, 1)
    return out


class Augment:
    """Training augmentation on cached uint8 images: random resized crop to the training side, optional
    horizontal flip and TrivialAugmentWide (torchvision.transforms.v2), then the serving normalisation."""

    def __init__(self, config: TrainConfig, preprocessing: Preprocessing, side: int) -> None:
        interpolation = (T.InterpolationMode.BICUBIC if preprocessing.interpolation == "bicubic"
                         else T.InterpolationMode.BILINEAR)
        steps: list[T.Transform] = [T.RandomResizedCrop(side, scale=(config.crop_min_scale, 1.0),
                                                        interpolation=interpolation, antialias=True)]
        if config.horizontal_flip:
            steps.append(T.RandomHorizontalFlip())
        if config.trivial_augment:
            steps.append(T.TrivialAugmentWide(interpolation=interpolation))
        self.transform = T.Compose(steps)
        self.preprocessing = preprocessing

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(torch.stack([self.transform(image) for image in images]), self.preprocessing)


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_cached(
    model: TransferNet, cached: CachedImages, preprocessing: Preprocessing, device: torch.device, batch_size: int = 64,
    with_embeddings: bool = False,
):
    """Logits (float32, CPU) and targets of every cached image (and the embeddings when asked), in eval mode."""
    model.eval()
    all_logits, all_embeddings = [], []
    for start in range(0, len(cached), batch_size):
        images = normalize_batch(cached.images[start : start + batch_size], preprocessing)
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits, embedding = model(images)
        all_logits.append(logits.float().cpu())
        if with_embeddings:
            all_embeddings.append(embedding.float().cpu())
    logits = torch.cat(all_logits) if all_logits else torch.empty(0)
    if with_embeddings:
        return logits, cached.targets, (torch.cat(all_embeddings) if all_embeddings else torch.empty(0))
    return logits, cached.targets


@torch.no_grad()
def predict_loader(model: TransferNet, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on CPU) and targets for every item of `loader` (an `ImageDataset` decoded per item)."""
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


# --- setup and plan --------------------------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    """What the run trains and is measured on."""

    labels: list[str]
    model: TransferNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    train_set: CachedImages
    """Training split, cached at `CACHE_MARGIN` x the training side."""
    val_set: CachedImages
    """Validation split, cached at the serving side."""
    test_set: CachedImages
    device: torch.device
    plan: RunPlan
    preprocessing: Preprocessing
    """Serving preprocessing (validation, test, export)."""
    augment: Augment
    fit_set: CachedImages | None = None
    """train + val at the training cache side: what the refit trains on."""
    deadline: float | None = None
    """`time.perf_counter()` by which training must stop to keep the time budget (None: no budget). The plan aims
    well inside it; this guard holds the budget when a shared CPU turns slower than the probe measured."""


@dataclass
class EpochProgress:
    """Where the run stands: what a checkpoint saves and a resumed run starts from."""

    history: list[EpochRecord] = field(default_factory=list)
    next_epoch: int = 0
    """Next validation interval of the current phase."""
    best_epoch: int = -1
    best_key: tuple[float, float] = (-1.0, 0.0)
    phase: str = "select"
    step: int = 0
    best_step: int = 0
    refit_steps: int = 0

    @property
    def epochs_without_improvement(self) -> int:
        return self.next_epoch - 1 - self.best_epoch if self.history else 0


def _new_model(config: TrainConfig, labels: list[str], device: torch.device, weights: str) -> TransferNet:
    torch.manual_seed(config.seed)
    model = build_network(config.backbone, len(labels), weights=weights, dropout=config.dropout)
    return model.to(device).to(memory_format=torch.channels_last)


def _enter_train_mode(config: TrainConfig, model: TransferNet, groups) -> None:
    enter_train_mode(model, groups)
    if config.freeze_bn:
        for layer in model.modules():
            if isinstance(layer, _NORM_TYPES):
                layer.eval()


def _batch_indices(config: TrainConfig, n: int, step: int, phase_seed: int) -> torch.Tensor:
    """The images of `step`: epoch-wise seeded permutations, so any step is reproducible on resume."""
    batch = min(config.batch_size, n)
    per_epoch = max(1, n // batch)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch + phase_seed))
    return order[offset * batch : (offset + 1) * batch]


def _train_step(config: TrainConfig, setup: TrainingSetup, data: CachedImages, step: int, phase_seed: int):
    model, device = setup.model, setup.device
    torch.manual_seed(config.seed * 1_000_003 + step + phase_seed)
    index = _batch_indices(config, len(data), step, phase_seed)
    images = setup.augment(data.images[index]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    targets = data.targets[index].to(device, non_blocking=True)
    with _autocast(device):
        logits, _ = model(images)
        loss = setup.criterion(logits.float(), targets)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    setup.scheduler.step()
    return loss.item(), (logits.argmax(1) == targets).sum().item(), len(targets)


def _probe_seconds_per_step(config: TrainConfig, model: TransferNet, train: CachedImages, preprocessing: Preprocessing,
                            side: int, device: torch.device, criterion: nn.Module) -> float:
    """Measured seconds of one training step (augmentation, forward, backward) at `side`, on a copy of the model."""
    probe = copy.deepcopy(model)
    probe.train()
    augment = Augment(config, preprocessing, side)
    rng_state = torch.get_rng_state()
    times = []
    for i in range(PROBE_STEPS + 1):
        started = time.perf_counter()
        index = torch.arange(i * config.batch_size, (i + 1) * config.batch_size) % len(train)
        images = augment(train.images[index]).to(device).contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits, _ = probe(images)
            loss = criterion(logits.float(), train.targets[index].to(device))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    torch.set_rng_state(rng_state)
    del probe
    return float(min(times[1:]))


def _probe_eval_seconds_per_image(model: TransferNet, val: CachedImages, preprocessing: Preprocessing,
                                  device: torch.device) -> float:
    if len(val) == 0:
        return 0.0
    sample = CachedImages(val.images[:16], val.targets[:16], val.records[:16])
    started = time.perf_counter()
    predict_cached(model, sample, preprocessing, device)
    return (time.perf_counter() - started) / len(sample)


def _choose_threads(config: TrainConfig, model: TransferNet, train: CachedImages, preprocessing: Preprocessing,
                    side: int, device: torch.device, criterion: nn.Module, show_progress: bool) -> int:
    """`config.threads`, or the faster of 1 and all intra-op threads, measured: on a shared CPU, threads that wait
    on each other can cost several times their gain (10x measured at load 10 on 2 cores)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
        return config.threads
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    many = _probe_seconds_per_step(config, model, train, preprocessing, side, device, criterion)
    torch.set_num_threads(1)
    single = _probe_seconds_per_step(config, model, train, preprocessing, side, device, criterion)
    chosen = 1 if single < many else threads
    torch.set_num_threads(chosen)
    if show_progress:
        tqdm.write(f"speed probe: {many:.2f} s/step with {threads} threads, {single:.2f} with 1: training with {chosen}")
    return chosen


def plan_run(config: TrainConfig, splits: Splits, seconds_so_far: float = 0.0, probe=None) -> RunPlan:
    """Steps, training resolution and validation interval: what the data asks for, fitted into the time budget.

    `probe(side) -> (seconds per training step at side, seconds per validation image)`; without a probe (or
    with --steps / --epochs / --train-image-size fixing everything) no time is estimated."""
    serve = config.preprocessing().image_size
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    select = n_val >= config.min_val_images
    refit = config.refit or not select
    refit_images = n_train + n_val if refit else n_train
    wanted = config.budget_steps(n_train if select else refit_images)
    side = config.train_image_size or config.default_train_image_size()
    budget = config.time_budget_seconds()
    fixed = config.steps is not None or config.epochs is not None
    common = dict(batch_size=min(config.batch_size, n_train if select else refit_images), image_size=serve,
                  train_images=n_train, val_images=n_val, test_images=n_test, refit=refit, refit_images=refit_images,
                  budget_steps=wanted, time_budget_seconds=budget, select=select)
    if budget is None or probe is None:
        steps = wanted
        return RunPlan(steps=steps, eval_every=config.evaluation_interval(steps, n_train), train_image_size=side,
                       reason="" if budget is None else "no speed probe", **common)
    step_seconds, eval_seconds = probe(side)
    refit_factor = refit_images / n_train if (refit and select) else 0.0

    def estimate(steps: int, at: int) -> float:
        per_step = step_seconds * (at / side) ** 2
        evals = math.ceil(steps / config.evaluation_interval(steps, n_train)) if select else -2
        return (seconds_so_far + steps * per_step * (1 + refit_factor) + (evals + 2) * n_val * eval_seconds
                + n_test * eval_seconds + (EXPORT_OVERHEAD_SECONDS if config.export else 0.0))

    reason = ""
    chosen_side, steps = side, wanted
    if not fixed and estimate(wanted, side) > budget:
        sides = [side] if config.train_image_size else [s for s in range(side, min(128, side) - 1, -32)] or [side]
        fits = [s for s in sides if estimate(wanted, s) <= budget]
        if fits:
            chosen_side = fits[0]
            reason = f"training side lowered from {side} to {chosen_side} px to fit the time budget"
        else:
            chosen_side = sides[-1]
            per_step = step_seconds * (chosen_side / side) ** 2 * (1 + refit_factor)
            spare = budget - estimate(0, chosen_side)
            steps = max(10, min(wanted, int(spare / max(per_step + n_val * eval_seconds * 10 / max(wanted, 1), 1e-9))))
            while steps > 10 and estimate(steps, chosen_side) > budget:
                steps = max(10, int(steps * 0.9))
            reason = (f"the time budget allows {steps} of the {wanted} steps the data asks for"
                      + (f", at {chosen_side} px" if chosen_side != side else ""))
    elif fixed and estimate(wanted, side) > budget:
        reason = "over the time budget: --steps/--epochs fix the schedule"
    probe_seconds = step_seconds * (chosen_side / side) ** 2
    return RunPlan(steps=steps, eval_every=config.evaluation_interval(steps, n_train), train_image_size=chosen_side,
                   seconds_per_step=probe_seconds, estimated_seconds=estimate(steps, chosen_side), reason=reason,
                   **common)


def build_model_and_optimizer(
    config: TrainConfig, splits: Splits, device: torch.device, run: RunDir | None = None, show_progress: bool = False,
    started: float | None = None,
) -> TrainingSetup:
    """Cache the images, plan the run (a resumed run reads its plan), then the network (seeded; no pretrained
    weights when resuming), optimizer, schedule and loss of the selection run."""
    started = time.perf_counter() if started is None else started
    labels = splits.labels()
    preprocessing = config.preprocessing()
    workers = max(1, config.workers)
    val_set = CachedImages.build(splits.val, labels, preprocessing, preprocessing.image_size, workers)
    test_set = CachedImages.build(splits.test, labels, preprocessing, preprocessing.image_size, workers)
    weights = "none" if config.resume else config.weights
    model = _new_model(config, labels, device, weights)
    loss_weights = class_weights(splits.train, labels).to(device) if config.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)

    caches: dict[int, CachedImages] = {}

    def train_cache(side: int) -> CachedImages:
        cache_side = math.ceil(CACHE_MARGIN * side)
        if cache_side not in caches:
            caches[cache_side] = CachedImages.build(splits.train, labels, preprocessing, cache_side, workers)
        return caches[cache_side]

    if run is not None and config.resume and run.plan.exists():
        plan = run.load_plan()
        if plan.threads:
            torch.set_num_threads(plan.threads)
    else:
        side0 = config.train_image_size or config.default_train_image_size()
        threads = _choose_threads(config, model, train_cache(side0), preprocessing, side0, device, criterion,
                                  show_progress) if device.type == "cpu" else None

        def probe(side: int) -> tuple[float, float]:
            return (_probe_seconds_per_step(config, model, train_cache(side), preprocessing, side, device, criterion),
                    _probe_eval_seconds_per_image(model, val_set, preprocessing, device))

        needs_probe = config.time_budget_seconds() is not None
        plan = plan_run(config, splits, time.perf_counter() - started, probe if needs_probe else None)
        plan.threads = threads
        if run is not None:
            run.save_plan(plan)
    if show_progress:
        tqdm.write(plan.describe())
    train_set = train_cache(plan.train_image_size)
    optimizer, scheduler = build_optimizer(model, config, plan.steps)
    augment = Augment(config, preprocessing, plan.train_image_size)
    return TrainingSetup(labels, model, optimizer, scheduler, criterion, train_set, val_set, test_set, device, plan,
                         preprocessing, augment)


def _prepare_refit(config: TrainConfig, setup: TrainingSetup, refit_steps: int, weights: str) -> None:
    """A fresh network and an optimizer/schedule over `refit_steps`, training on train + val."""
    if setup.fit_set is None:
        side = math.ceil(CACHE_MARGIN * setup.plan.train_image_size)
        val_small = CachedImages.build(setup.val_set.records, setup.labels, setup.preprocessing, side, max(1, config.workers))
        setup.fit_set = CachedImages.concat([setup.train_set, val_small])
    setup.model = _new_model(config, setup.labels, setup.device, weights)
    setup.optimizer, setup.scheduler = build_optimizer(setup.model, config, refit_steps)
    if config.class_weights:
        weights_tensor = class_weights(setup.fit_set.records, setup.labels).to(setup.device)
        setup.criterion = nn.CrossEntropyLoss(weight=weights_tensor, label_smoothing=config.label_smoothing)


def resume_from_checkpoint(config: TrainConfig, run: RunDir, setup: TrainingSetup) -> EpochProgress:
    """Load the last checkpoint's model, optimizer and schedule into `setup`; where the run stopped."""
    checkpoint = run.load_checkpoint(setup.device)
    if checkpoint.labels != setup.labels or checkpoint.backbone != config.backbone:
        raise DataError(f"{run.checkpoint} was trained on other labels or another backbone; it cannot be resumed here")
    if checkpoint.phase in ("refit", "done") and checkpoint.refit_steps:
        _prepare_refit(config, setup, checkpoint.refit_steps, "none")
    setup.model.load_state_dict(checkpoint.model)
    setup.optimizer.load_state_dict(checkpoint.optimizer)
    setup.scheduler.load_state_dict(checkpoint.scheduler)
    return EpochProgress(checkpoint.history, checkpoint.epoch + 1, checkpoint.best_epoch, checkpoint.best_key,
                         checkpoint.phase, checkpoint.step, checkpoint.best_step, checkpoint.refit_steps)


def _save_checkpoint(config: TrainConfig, run: RunDir, setup: TrainingSetup, progress: EpochProgress) -> None:
    run.save_checkpoint(
        Checkpoint(
            model=setup.model.state_dict(),
            optimizer=setup.optimizer.state_dict(),
            scheduler=setup.scheduler.state_dict(),
            epoch=progress.next_epoch - 1,
            best_epoch=progress.best_epoch,
            best_key=progress.best_key,
            history=progress.history,
            labels=setup.labels,
            backbone=config.backbone,
            config=config,
            phase=progress.phase,
            step=progress.step,
            best_step=progress.best_step,
            refit_steps=progress.refit_steps,
        )
    )


REFIT_SEED = 7919
"""Offset of the refit's shuffling and augmentation seeds from the selection run's."""


def _run_phase(config: TrainConfig, run: RunDir, setup: TrainingSetup, progress: EpochProgress, show_progress: bool,
               data: CachedImages, total_steps: int, validate: bool) -> None:
    """Train `data` from `progress.step` to `total_steps`, one interval of `eval_every` steps at a time;
    after each: validate (selection run) and checkpoint."""
    groups = setup.model.layer_groups()
    interval = setup.plan.eval_every
    intervals = math.ceil(total_steps / interval)
    phase_seed = 0 if validate else REFIT_SEED
    epochs_without_improvement = progress.epochs_without_improvement if validate else 0
    bar = tqdm(total=total_steps, initial=progress.step, disable=not show_progress, unit="step", leave=True,
               desc="select" if validate else "refit")
    try:
        for epoch in range(progress.next_epoch, intervals):
            if validate and epochs_without_improvement >= config.patience:
                break
            started = time.perf_counter()
            count = trainable_group_count(config.strategy, epoch, intervals, len(groups))
            set_trainable(groups, count)
            _enter_train_mode(config, setup.model, groups)
            loss_sum, correct, seen = 0.0, 0, 0
            stop = min(total_steps, (epoch + 1) * interval)
            out_of_time = False
            for step in range(progress.step, stop):
                if setup.deadline is not None and step > progress.step and time.perf_counter() > setup.deadline:
                    out_of_time, stop = True, step
                    bar.write(f"time budget reached at step {step} of {total_steps}: stopping this phase here")
                    break
                loss, right, n = _train_step(config, setup, data, step, phase_seed)
                loss_sum, correct, seen = loss_sum + loss * n, correct + right, seen + n
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            train_seconds = time.perf_counter() - started
            progress.step, progress.next_epoch = stop, epoch + 1
            if validate:
                val_logits, val_targets = predict_cached(setup.model, setup.val_set, setup.preprocessing, setup.device)
                val = evaluate_predictions(_probabilities(val_logits), val_targets.numpy(), setup.labels)
                val_loss = float(nn.functional.cross_entropy(val_logits, val_targets))
                record = EpochRecord(
                    epoch=epoch, trainable_groups=count, train_loss=loss_sum / max(1, seen),
                    train_accuracy=correct / max(1, seen), val_loss=val_loss, val_accuracy=val.accuracy,
                    val_macro_f1=val.macro_f1, seconds=time.perf_counter() - started,
                    train_images_per_second=seen / max(train_seconds, 1e-9), step=stop,
                )
                progress.history.append(record)
                if show_progress:
                    bar.write(f"step {stop}: val accuracy {val.accuracy:.4f}, macro-F1 {val.macro_f1:.4f}, "
                              f"val loss {val_loss:.4f} ({record.train_images_per_second:.0f} img/s)")
                key = (val.accuracy, -val_loss)
                if key > progress.best_key:
                    progress.best_key, progress.best_epoch, progress.best_step = key, epoch, stop
                    epochs_without_improvement = 0
                    run.save_best_weights(setup.model.state_dict())
                else:
                    epochs_without_improvement += 1
            _save_checkpoint(config, run, setup, progress)
            if out_of_time:
                break
    finally:
        bar.close()


def run_epochs(
    config: TrainConfig, run: RunDir, setup: TrainingSetup, progress: EpochProgress, show_progress: bool
) -> EpochProgress:
    """The selection run (validated every `eval_every` steps, early stopping), then with `refit` a fresh model
    trained on train+val for the chosen step count scaled to the larger set; checkpoints after each interval."""
    if progress.phase == "select" and not setup.plan.select:
        progress.refit_steps, progress.phase, progress.step, progress.next_epoch = setup.plan.steps, "refit", 0, 0
        _prepare_refit(config, setup, progress.refit_steps, config.weights)
        if show_progress:
            tqdm.write(f"{len(setup.val_set)} validation images are too few to choose a step count "
                       f"(--min-val-images {config.min_val_images}): training on all {len(setup.fit_set)} for "
                       f"{progress.refit_steps} steps")
    if progress.phase == "select":
        _run_phase(config, run, setup, progress, show_progress, setup.train_set, setup.plan.steps, validate=True)
        if config.refit:
            n_fit = len(setup.train_set) + len(setup.val_set)
            progress.refit_steps = max(1, round(progress.best_step * n_fit / len(setup.train_set)))
            if setup.deadline is not None and progress.history:
                seconds_per_step = setup.plan.batch_size / max(1e-9, min(h.train_images_per_second for h in progress.history))
                fits = int((setup.deadline - time.perf_counter()) / seconds_per_step)
                if fits < progress.refit_steps:
                    tqdm.write(f"time budget: the refit gets {max(1, fits)} of {progress.refit_steps} steps")
                    progress.refit_steps = max(1, fits)
            progress.phase, progress.step, progress.next_epoch = "refit", 0, 0
            _prepare_refit(config, setup, progress.refit_steps, config.weights)
            if show_progress:
                tqdm.write(f"best validation at step {progress.best_step}: refit on {n_fit} images (train+val) for "
                           f"{progress.refit_steps} steps")
        else:
            progress.phase = "done"
            _save_checkpoint(config, run, setup, progress)
    if progress.phase == "refit":
        _run_phase(config, run, setup, progress, show_progress, setup.fit_set, progress.refit_steps, validate=False)
        run.save_refit_weights(setup.model.state_dict())
        progress.phase = "done"
        _save_checkpoint(config, run, setup, progress)
    return progress


def calibrate_and_test(config: TrainConfig, run: RunDir, setup: TrainingSetup) -> EvaluationReport:
    """Temperature fitted on validation with the selection run's best weights; folded into the final weights
    (the refit's, or the best) as `model.pt`; the OOD detector fitted on validation outputs of that final model
    (`training.ood_fit`); then the held-out test, or without a test split the validation report, each with its
    image count and 95% interval."""
    model, device = setup.model, setup.device
    if not setup.plan.select:
        return _finish_without_validation(config, run, setup)
    model.load_state_dict(run.load_best_weights(device))
    val_logits, val_targets = predict_cached(model, setup.val_set, setup.preprocessing, device)
    temperature = fit_temperature(val_logits, val_targets)
    refit = config.refit and run.refit_weights.exists()
    if refit:
        model.load_state_dict(run.load_refit_weights(device))
    fold_temperature(model, temperature)
    run.save_final_weights(model.state_dict())
    run.save_calibration(temperature)
    fit_run_ood(config, run, model, cached_batches(setup.val_set, setup.preprocessing), device)  # final model, fp32

    if len(setup.test_set):
        test_logits, test_targets = predict_cached(model, setup.test_set, setup.preprocessing, device)
        report = evaluate_predictions(_probabilities(test_logits), test_targets.numpy(), setup.labels)
        report.note = (f"held-out test split: {report.images} images never used for training or selection"
                       + (" (the exported model is the refit on train+val)" if refit else ""))
        write_evaluation_html(report, [r.path for r in setup.test_set.records], _probabilities(test_logits),
                              test_targets.numpy(), run.evaluation_html, title="Held-out test split")
    else:
        report = evaluate_predictions(_probabilities(val_logits / temperature), val_targets.numpy(), setup.labels)
        report.source = "validation"
        report.note = (f"no test split (too few images to hold one out; --test-fraction sets one): these are the "
                       f"{report.images} validation images of the selection run, which chose the step count, so the "
                       "estimate is optimistic" + ("; the exported model is the refit on train+val, which also "
                       "trained on them" if refit else "") + ". Measure the artifact on other labelled images with "
                       "`transfer-serve evaluate`.")
    run.save_test_report(report)
    return report


def _finish_without_validation(config: TrainConfig, run: RunDir, setup: TrainingSetup) -> EvaluationReport:
    """No selection run: the run's weights as they are (temperature 1: no held-out image to fit one on), the test
    split if there is one, else a report that says there is no held-out estimate."""
    model, device = setup.model, setup.device
    model.load_state_dict(run.load_refit_weights(device))
    run.save_final_weights(model.state_dict())
    run.save_calibration(1.0)
    run.save_ood(None)  # an OOD threshold needs held-out images too
    if config.ood_method != "none":
        tqdm.write("no out-of-distribution detector for this run: no validation images to fit its threshold on")
    if len(setup.test_set):
        logits, targets = predict_cached(model, setup.test_set, setup.preprocessing, device)
        report = evaluate_predictions(_probabilities(logits), targets.numpy(), setup.labels)
        report.note = (f"held-out test split: {report.images} images never used for training; probabilities not "
                       "calibrated (no validation images to fit a temperature on)")
    else:
        labels = setup.labels
        report = EvaluationReport(
            images=0, accuracy=0.0, macro_f1=0.0, expected_calibration_error=0.0, labels=labels, per_class={},
            confusion_matrix=[[0] * len(labels) for _ in labels], accuracy_ci95=(0.0, 1.0), source="none",
            note=(f"no held-out estimate: {len(setup.fit_set)} labelled images are too few for a test split and for "
                  f"a validation split of at least {config.min_val_images} (--min-val-images), so all of them trained "
                  "the model for the step budget. Measure the artifact on other labelled images with `transfer-serve "
                  "evaluate`, or hold out a test split with --test-fraction."),
        )
    run.save_test_report(report)
    return report


def export_if_requested(config: TrainConfig, run: RunDir) -> Path | None:
    """The run's artifact (exported now unless an earlier attempt of this run already did), or None."""
    if not config.export:
        return None
    if not run.artifact.exists():
        export_run(run.root, run.artifact)
    return run.artifact


def train(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    threads = torch.get_num_threads()
    try:
        return _train(config, show_progress)
    finally:
        torch.set_num_threads(threads)  # the speed probe may have chosen fewer for this run


def _train(config: TrainConfig, show_progress: bool) -> TrainResult:
    started = time.perf_counter()
    run = open_run_dir(config)
    device = torch.device(resolve_device(config.device))
    splits, skipped = prepare_splits(config, run)
    if config.audit:
        warn_before_training(splits, skipped)
    setup = build_model_and_optimizer(config, splits, device, run, show_progress, started)
    budget = config.time_budget_seconds()
    if budget is not None:
        reserve = EXPORT_OVERHEAD_SECONDS if config.export else 0.0
        setup.deadline = (started if not config.resume else time.perf_counter()) + budget - reserve
    progress = resume_from_checkpoint(config, run, setup) if config.resume else EpochProgress()
    progress = run_epochs(config, run, setup, progress, show_progress)
    run.save_history(progress.history)
    test = calibrate_and_test(config, run, setup)
    artifact = export_if_requested(config, run)
    return TrainResult(
        run_dir=run.root, best_epoch=progress.best_epoch, best_step=progress.best_step,
        refit_steps=progress.refit_steps if config.refit else 0, history=progress.history, test=test,
        skipped=skipped, artifact=artifact, plan=setup.plan,
    )
