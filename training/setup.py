"""What a run trains and is measured on (`TrainingSetup`): the caches, the plan, the network, its optimizer,
schedule and loss; built once at the start and again, fresh, for the refit."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from models.network import HeadInput, TransferNet, build_network
from models.preprocessing import Preprocessing
from training import speed
from training.cache import CACHE_MARGIN, Augment, CachedImages
from training.config import TrainConfig
from training.data import Splits
from training.optim import build_optimizer, loss_function
from training.plan import plan_run, reserve_seconds
from training.run_dir import RunDir, RunPlan


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
    budget_end: float | None = None
    """`time.perf_counter()` at which the time budget ends (None: no budget)."""
    deadline: float | None = None
    """`time.perf_counter()` by which training must stop to keep the time budget (None: no budget): `budget_end`
    less the plan's reserve, then less one re-estimated from each validation pass (`retime`). The plan aims well
    inside it; this guard holds the budget when the CPU turns slower than the speed probe measured."""

    def retime(self, eval_seconds: float, step_seconds: float, export: bool) -> None:
        """Move the deadline by this run's own measurements (seconds per validation image, per training step): a
        busier CPU or a bigger backbone than the probe saw needs more time after training, not less."""
        if self.budget_end is not None:
            self.deadline = self.budget_end - reserve_seconds(len(self.val_set), len(self.test_set), eval_seconds,
                                                              step_seconds, export)


def new_model(config: TrainConfig, labels: list[str], device: torch.device, weights: str,
              head_input: HeadInput = "embedding") -> TransferNet:
    """The network, seeded by `config.seed`, on `device` in channels-last layout."""
    torch.manual_seed(config.seed)
    model = build_network(config.backbone, len(labels), weights=weights, dropout=config.dropout, head_input=head_input)
    return model.to(device).to(memory_format=torch.channels_last)


def build_setup(
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
    model = new_model(config, labels, device, weights)
    criterion = loss_function(config, splits.train, labels, device)

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
        threads = speed.choose_threads(config, model, train_cache(side0), preprocessing, side0, device, criterion,
                                       show_progress) if device.type == "cpu" else None

        def probe(side: int) -> tuple[float, float]:
            return (speed.seconds_per_step(config, model, train_cache(side), preprocessing, side, device, criterion),
                    speed.eval_seconds_per_image(model, val_set, preprocessing, device))

        plan = plan_run(config, splits, time.perf_counter() - started, probe if config.time_budget is not None else None)
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


def prepare_refit(config: TrainConfig, setup: TrainingSetup, refit_steps: int, weights: str) -> None:
    """A fresh network and an optimizer/schedule over `refit_steps`, training on train + val."""
    if setup.fit_set is None:
        side = math.ceil(CACHE_MARGIN * setup.plan.train_image_size)
        val_small = CachedImages.build(setup.val_set.records, setup.labels, setup.preprocessing, side, max(1, config.workers))
        setup.fit_set = CachedImages.concat([setup.train_set, val_small])
    setup.model = new_model(config, setup.labels, setup.device, weights)
    setup.optimizer, setup.scheduler = build_optimizer(setup.model, config, refit_steps)
    if config.class_weights:
        setup.criterion = loss_function(config, setup.fit_set.records, setup.labels, setup.device)
