"""The training flow: data -> plan -> candidate(s) -> calibration and an honest estimate -> artifact.

`train` runs the steps below in order, each in the module of its concept; what each writes to the run folder,
and how a resumed run reads it back, is `training.run_dir.RunDir`'s.

- `prepare_splits`: discover, scan and split the data once (`training.data`).
- `training.setup.build_setup`: decode the images once into memory (`training.cache`), measure the speed
  (`training.speed`), plan steps and training resolution into `--time-budget` (`training.plan`), build the
  network, optimizer and loss (`training.optim`).
- `training.candidates.finetune`: the selection run and the refit (`training.loop` trains each phase).
- `training.finish.calibrate_and_test`: temperature, OOD detector, held-out estimate.
- `export_if_requested`: the artifact (`training.export`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from models.inference import resolve_device
from training.candidates.finetune import resume_finetune, train_finetune
from training.config import TrainConfig
from training.data import DataError, SkippedImage, Splits, discover_images, scan_readable, split_records
from training.evaluate import EvaluationReport
from training.export import export_run
from training.finish import calibrate_and_test
from training.plan import EXPORT_OVERHEAD_SECONDS
from training.run_dir import EpochRecord, RunDir, RunPlan, RunState
from training.setup import build_setup


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
    setup = build_setup(config, splits, device, run, show_progress, started)
    if config.time_budget is not None:
        reserve = EXPORT_OVERHEAD_SECONDS if config.export else 0.0
        setup.deadline = (started if not config.resume else time.perf_counter()) + config.time_budget - reserve
    state = resume_finetune(config, run, setup) if config.resume else RunState()
    state = train_finetune(config, run, setup, state, show_progress)
    run.save_history(state.history)
    test = calibrate_and_test(config, run, setup)
    artifact = export_if_requested(config, run)
    return TrainResult(run_dir=run.root, state=state, test=test, skipped=skipped, artifact=artifact, plan=setup.plan)
