"""The fine-tune candidate: a selection run on the train split (validated every `eval_every` steps, early
stopping), whose best step is the step count and whose best validation is its estimate; then, if it is chosen
and a refit is planned, a fresh network trained on train+val for that count scaled to the larger set, so no
label is spent on model selection alone."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from training.candidates.selection import CandidateEstimate
from training.config import TrainConfig
from training.data import DataError
from training.loop import run_phase, save_checkpoint
from training.run_dir import RunDir, RunState
from training.setup import TrainingSetup, prepare_refit


def resume_finetune(config: TrainConfig, run: RunDir, setup: TrainingSetup) -> RunState:
    """Load the last checkpoint's model, optimizer and schedule into `setup`; where the run stopped."""
    checkpoint = run.load_checkpoint(setup.device)
    if checkpoint.labels != setup.labels or checkpoint.backbone != config.backbone:
        raise DataError(f"{run.checkpoint} was trained on other labels or another backbone; it cannot be resumed here")
    if checkpoint.state.phase in ("refit", "done") and checkpoint.state.refit_steps:
        prepare_refit(config, setup, checkpoint.state.refit_steps, "none")
    setup.model.load_state_dict(checkpoint.model)
    setup.optimizer.load_state_dict(checkpoint.optimizer)
    setup.scheduler.load_state_dict(checkpoint.scheduler)
    return checkpoint.state


def run_selection(config: TrainConfig, run: RunDir, setup: TrainingSetup, state: RunState,
                  show_progress: bool) -> None:
    """The selection run on the train split (validated every `eval_every` steps, early stopping); without one
    (no validation image, or too few with --candidate finetune) the run moves straight to training on all."""
    if not setup.plan.select:
        state.refit_steps, state.phase, state.step, state.next_epoch = setup.plan.steps, "refit", 0, 0
        prepare_refit(config, setup, state.refit_steps, config.weights)
        if show_progress:
            tqdm.write(f"{len(setup.val_set)} validation images are too few to choose a step count "
                       f"(--min-val-images {config.min_val_images}): training on all {len(setup.fit_set)} for "
                       f"{state.refit_steps} steps")
        return
    run_phase(config, run, setup, state, show_progress, setup.train_set, setup.plan.steps, validate=True)


def estimate(setup: TrainingSetup, state: RunState) -> CandidateEstimate:
    """The fine-tune's held-out estimate: its best validation (or its only one, at the end of its run)."""
    how = (f"best of {len(state.history)} validations of the selection run (step {state.best_step})"
           if setup.plan.choose_steps else f"one validation at the end of its {state.best_step} steps on the train split")
    return CandidateEstimate(candidate="finetune", accuracy=state.best_key[0] if state.history else None,
                             images=len(setup.val_set), how=how)


def start_refit(config: TrainConfig, run: RunDir, setup: TrainingSetup, state: RunState, show_progress: bool) -> None:
    """After the selection run: with a planned refit, a fresh model for the chosen step count scaled to
    train+val (what still fits the time budget); without, the run is done."""
    if not setup.plan.refit:
        state.phase = "done"
        save_checkpoint(config, run, setup, state)
        return
    n_fit = len(setup.train_set) + len(setup.val_set)
    state.refit_steps = max(1, round(state.best_step * n_fit / len(setup.train_set)))
    if setup.deadline is not None and state.history:
        seconds_per_step = setup.plan.batch_size / max(1e-9, min(h.train_images_per_second for h in state.history))
        fits = int((setup.deadline - time.perf_counter()) / seconds_per_step)
        if fits < state.refit_steps:
            tqdm.write(f"time budget: the refit gets {max(1, fits)} of {state.refit_steps} steps")
            state.refit_steps = max(1, fits)
    state.phase, state.step, state.next_epoch = "refit", 0, 0
    prepare_refit(config, setup, state.refit_steps, config.weights)
    if show_progress:
        tqdm.write(f"best validation at step {state.best_step}: refit on {n_fit} images (train+val) for "
                   f"{state.refit_steps} steps")


def run_refit(config: TrainConfig, run: RunDir, setup: TrainingSetup, state: RunState, show_progress: bool) -> None:
    """Train the refit (train+val) to its step count; its weights are `refit.pt`."""
    run_phase(config, run, setup, state, show_progress, setup.fit_set, state.refit_steps, validate=False)
    run.save_refit_weights(setup.model.state_dict())
    state.phase = "done"
    save_checkpoint(config, run, setup, state)
