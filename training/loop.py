"""The training loop: one phase (the selection run, or the refit) trained interval by interval, each interval
validated (selection run) and checkpointed, so an interrupted run resumes at the interval it stopped in."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from training.cache import CachedImages, autocast, predict_cached, probabilities
from training.config import TrainConfig
from training.evaluate import evaluate_predictions
from training.run_dir import Checkpoint, EpochRecord, RunDir, RunState
from training.setup import TrainingSetup
from training.strategies import enter_train_mode, set_trainable, trainable_group_count

REFIT_SEED = 7919
"""Offset of the refit's shuffling and augmentation seeds from the selection run's."""


def batch_indices(config: TrainConfig, n: int, step: int, phase_seed: int) -> torch.Tensor:
    """The images of `step`: epoch-wise seeded permutations, so any step is reproducible on resume."""
    batch = min(config.batch_size, n)
    per_epoch = max(1, n // batch)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch + phase_seed))
    return order[offset * batch : (offset + 1) * batch]


def train_step(config: TrainConfig, setup: TrainingSetup, data: CachedImages, step: int, phase_seed: int):
    """One optimizer step on the augmented batch of `step`: (loss, correct, images)."""
    model, device = setup.model, setup.device
    torch.manual_seed(config.seed * 1_000_003 + step + phase_seed)
    index = batch_indices(config, len(data), step, phase_seed)
    images = setup.augment(data.images[index]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    targets = data.targets[index].to(device, non_blocking=True)
    with autocast(device):
        logits, _ = model(images)
        loss = setup.criterion(logits.float(), targets)
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()
    setup.scheduler.step()
    return loss.item(), (logits.argmax(1) == targets).sum().item(), len(targets)


def save_checkpoint(config: TrainConfig, run: RunDir, setup: TrainingSetup, state: RunState) -> None:
    run.save_checkpoint(Checkpoint(model=setup.model.state_dict(), optimizer=setup.optimizer.state_dict(),
                                   scheduler=setup.scheduler.state_dict(), state=state, labels=setup.labels,
                                   backbone=config.backbone, config=config))


def run_phase(config: TrainConfig, run: RunDir, setup: TrainingSetup, state: RunState, show_progress: bool,
              data: CachedImages, total_steps: int, validate: bool) -> None:
    """Train `data` from `state.step` to `total_steps`, one interval of `eval_every` steps at a time;
    after each: validate (selection run) and checkpoint."""
    groups = setup.model.layer_groups()
    interval = setup.plan.eval_every
    intervals = math.ceil(total_steps / interval)
    phase_seed = 0 if validate else REFIT_SEED
    epochs_without_improvement = state.epochs_without_improvement if validate else 0
    bar = tqdm(total=total_steps, initial=state.step, disable=not show_progress, unit="step", leave=True,
               desc="select" if validate else "refit")
    try:
        for epoch in range(state.next_epoch, intervals):
            if validate and epochs_without_improvement >= config.patience:
                break
            started = time.perf_counter()
            count = trainable_group_count(config.strategy, epoch, intervals, len(groups))
            set_trainable(groups, count)
            enter_train_mode(setup.model, groups, config.freeze_bn)
            loss_sum, correct, seen = 0.0, 0, 0
            first_step, stop = state.step, min(total_steps, (epoch + 1) * interval)
            out_of_time = False
            for step in range(state.step, stop):
                if setup.deadline is not None and step > state.step and time.perf_counter() > setup.deadline:
                    out_of_time, stop = True, step
                    bar.write(f"time budget reached at step {step} of {total_steps}: stopping this phase here")
                    break
                loss, right, n = train_step(config, setup, data, step, phase_seed)
                loss_sum, correct, seen = loss_sum + loss * n, correct + right, seen + n
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            train_seconds = time.perf_counter() - started
            state.step, state.next_epoch = stop, epoch + 1
            if validate:
                val_started = time.perf_counter()
                val_logits, val_targets = predict_cached(setup.model, setup.val_set, setup.preprocessing, setup.device)
                if stop > first_step:
                    setup.retime((time.perf_counter() - val_started) / max(1, len(setup.val_set)),
                                 train_seconds / (stop - first_step), config.export)
                val = evaluate_predictions(probabilities(val_logits), val_targets.numpy(), setup.labels)
                val_loss = float(nn.functional.cross_entropy(val_logits, val_targets))
                record = EpochRecord(
                    epoch=epoch, trainable_groups=count, train_loss=loss_sum / max(1, seen),
                    train_accuracy=correct / max(1, seen), val_loss=val_loss, val_accuracy=val.accuracy,
                    val_macro_f1=val.macro_f1, seconds=time.perf_counter() - started,
                    train_images_per_second=seen / max(train_seconds, 1e-9), step=stop,
                )
                state.history.append(record)
                if show_progress:
                    bar.write(f"step {stop}: val accuracy {val.accuracy:.4f}, macro-F1 {val.macro_f1:.4f}, "
                              f"val loss {val_loss:.4f} ({record.train_images_per_second:.0f} img/s)")
                key = (val.accuracy, -val_loss)
                if key > state.best_key:
                    state.best_key, state.best_epoch, state.best_step = key, epoch, stop
                    epochs_without_improvement = 0
                    run.save_best_weights(setup.model.state_dict())
                else:
                    epochs_without_improvement += 1
            save_checkpoint(config, run, setup, state)
            if out_of_time:
                break
    finally:
        bar.close()
