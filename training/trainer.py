"""The training flow: data -> plan -> candidate(s) -> calibration and an honest estimate -> artifact.

`train` runs the steps below in order, each in the module of its concept; what each writes to the run folder,
and how a resumed run reads it back, is `training.run_dir.RunDir`'s.

- `prepare_splits`: discover, scan and split the data once (`training.data`).
- `training.setup.build_setup`: decode the images once into memory (`training.cache`), measure the speed
  (`training.speed`), plan steps and training resolution into `--time-budget` (`training.plan`), build the
  network, optimizer and loss (`training.optim`).
- `train_candidates`: the candidates of the plan, each estimated on the validation split, the best one kept
  (`training.candidates.selection`): the probe (`training.candidates.probe`, seconds) and the fine-tune's
  selection run (`training.candidates.finetune`; `training.loop` trains each phase); then the winner's refit on
  train+val.
- `training.finish.calibrate_and_test`: temperature, OOD detector, held-out estimate of the chosen weights.
- `export_if_requested`: the artifact (`training.export`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from models.inference import resolve_device
from training.candidates import finetune
from training.candidates.probe import refit_probe, train_probe
from training.candidates.selection import Selection, choose
from training.audit.checks import warn_before_training
from training.config import TrainConfig
from training.data import DataError, SkippedImage, Splits, discover_images, scan_readable, split_records
from training.evaluate import EvaluationReport
from training.export import export_run
from training.finish import ChosenWeights, calibrate_and_test
from training.loop import save_checkpoint
from training.plan import EXPORT_OVERHEAD_SECONDS
from training.run_dir import EpochRecord, RunDir, RunPlan, RunState
from training.setup import TrainingSetup, build_setup, new_model


class TrainResult(BaseModel):
    run_dir: Path
    state: RunState
    """Where the run ended: history, best step, refit steps."""
    test: EvaluationReport
    """The held-out test report, or (no test split) the selection run's validation report, `source` says which."""
    skipped: list[SkippedImage]
    artifact: Path | None
    plan: RunPlan | None = None

    @property
    def selection(self) -> Selection | None:
        """The exported candidate and every candidate's estimate (None: a fine-tune with nothing to compare)."""
        return self.state.selection

    @property
    def history(self) -> list[EpochRecord]:
        return self.state.history

    @property
    def best_epoch(self) -> int:
        return self.state.best_epoch

    @property
    def best_step(self) -> int:
        return self.state.best_step

    @property
    def refit_steps(self) -> int:
        """Steps of the refit on train+val (0: no refit; the best selection weights were exported)."""
        return self.state.refit_steps


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


def export_if_requested(config: TrainConfig, run: RunDir) -> Path | None:
    """The run's artifact (exported now unless an earlier attempt of this run already did), or None."""
    if not config.export:
        return None
    if not run.artifact.exists():
        export_run(run.root, run.artifact)
    return run.artifact


def train_candidates(config: TrainConfig, run: RunDir, setup: TrainingSetup, state: RunState,
                     show_progress: bool) -> RunState:
    """The plan's candidates trained on the train split and estimated on the validation split; the best is kept
    (`training.candidates.selection.choose`) and refit on train+val: the probe in seconds, the fine-tune for the
    chosen step count. Only the winner's refit is paid for."""
    candidates = setup.plan.candidates
    if state.phase == "select":
        probe = train_probe(config, run, setup, show_progress) if "probe" in candidates else None
        estimates = [probe.estimate] if probe else []
        if "finetune" in candidates:
            finetune.run_selection(config, run, setup, state, show_progress)
            if setup.plan.select:
                estimates.append(finetune.estimate(setup, state))
        if estimates:
            state.selection = choose(estimates)
            run.save_selection(state.selection)
            if show_progress:
                tqdm.write(state.selection.describe())
        if probe and state.selection.chosen == "probe":
            if setup.plan.select:
                refit_probe(config, run, setup, probe)
            state.phase = "done"
            save_checkpoint(config, run, setup, state)
        elif state.phase == "select":
            finetune.start_refit(config, run, setup, state, show_progress)
    if state.phase == "refit":
        finetune.run_refit(config, run, setup, state, show_progress)
    return state


def chosen_weights(run: RunDir, setup: TrainingSetup, state: RunState) -> ChosenWeights:
    """The weights of the chosen candidate: those calibrated on validation, and those exported."""
    device, held_out = setup.device, setup.plan.select
    if state.selection is not None and state.selection.chosen == "probe":
        probe = run.load_probe_weights(device)
        final = run.load_probe_weights(device, refit=True) if held_out else probe
        return ChosenWeights("probe", calibrate=probe if held_out else None, final=final, refit=held_out)
    if not held_out:
        return ChosenWeights("finetune", calibrate=None, final=run.load_refit_weights(device), refit=True)
    best = run.load_best_weights(device)
    refit = setup.plan.refit and run.refit_weights.exists()
    return ChosenWeights("finetune", calibrate=best, final=run.load_refit_weights(device) if refit else best,
                         refit=refit)


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
    setup = build_setup(config, splits, device, run, show_progress, started)
    if config.time_budget is not None:
        reserve = setup.plan.reserve_seconds
        if reserve is None:  # a plan saved before the reserve was estimated
            reserve = EXPORT_OVERHEAD_SECONDS if config.export else 0.0
        setup.budget_end = (started if not config.resume else time.perf_counter()) + config.time_budget
        setup.deadline = setup.budget_end - reserve
    state = finetune.resume_finetune(config, run, setup) if config.resume else RunState()
    state = train_candidates(config, run, setup, state, show_progress)
    run.save_history(state.history)
    if state.selection is not None and state.selection.head_input != "embedding":  # the probe's head normalises
        setup.model = new_model(config, setup.labels, device, "none", head_input=state.selection.head_input)
    test = calibrate_and_test(config, run, setup, chosen_weights(run, setup, state))
    artifact = export_if_requested(config, run)
    return TrainResult(run_dir=run.root, state=state, test=test, skipped=skipped, artifact=artifact, plan=setup.plan)
