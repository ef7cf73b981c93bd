"""A training run folder: the path of every file a run writes, and how each is saved and read back.

A run directory holds everything a run produces, so an interrupted run resumes from it:
`splits.csv` (the exact train/val/test split), `skipped.json` (unreadable images and why),
`plan.json` (steps, resolution, time estimate), `checkpoint.pt` (last validation or refit interval: model,
optimizer, scheduler, phase, history and the run's configuration), `best.pt` (best validation weights of the
selection run), `refit.pt` (the refit on train+val), `probe.pt` and `probe_refit.pt` (the probe candidate fitted
on train, and on train+val), `selection.json` (the chosen candidate and each one's estimate), `model.pt` (the
chosen candidate's refit, or best, weights with the fitted
softmax temperature folded in: what is tested and exported), `calibration.json`, `history.json`, `test_report.json`, `confusion_matrix.png`,
the out-of-distribution detector fitted on the final model (`ood.json`, its summary, and `ood.npz`, its
arrays, when the method has any) and the exported `artifact/`. Every file is written atomically (`models.files.atomic_write`): a crash
leaves the previous version or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, overload

import torch
from pydantic import BaseModel, Field, TypeAdapter

from models.files import atomic_write, atomic_write_bytes, atomic_write_text
from models.ood import OOD_FILE, OODDetector, OODSummary
from training.candidates.selection import CandidateName, Selection
from training.config import TrainConfig
from training.data import DataError, SkippedImage, Splits, read_csv_manifest, split_records, write_csv_manifest
from training.evaluate import EvaluationReport, save_confusion_matrix_png

StateDict = dict[str, Any]


class EpochRecord(BaseModel):
    """One validation of the selection run (every `eval_every` optimizer steps; every epoch with --epochs)."""

    epoch: int
    """Index of the validation (0-based)."""
    trainable_groups: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    train_images_per_second: float
    step: int = 0
    """Optimizer steps done when this validation ran."""


class RunPlan(BaseModel):
    """What the run will do, decided before its first step (and read back on --resume)."""

    steps: int
    """Optimizer steps of the selection run."""
    eval_every: int
    batch_size: int
    train_image_size: int
    image_size: int
    """Serving (and validation, test, export) input side."""
    train_images: int
    val_images: int
    test_images: int
    refit: bool
    refit_images: int
    select: bool = True
    """False: too few validation images to choose a step count; one run on train+val for `steps`."""
    budget_steps: int
    """What the data asked for before the time budget."""
    time_budget_seconds: float | None = None
    seconds_per_step: float | None = None
    """Measured by the speed probe at `train_image_size` (None: no probe)."""
    eval_seconds_per_image: float | None = None
    """Measured by the speed probe at the serving size (None: no probe)."""
    estimated_seconds: float | None = None
    reserve_seconds: float | None = None
    """Training stops this long before the time budget ends (`training.plan.reserve_seconds`), estimated from the
    speed probe; each validation pass re-estimates it from what it measured (None: no probe)."""
    reason: str = ""
    threads: int | None = None
    """CPU intra-op threads the run trains with (chosen by the speed probe unless --threads sets them)."""
    candidates: list[CandidateName] = ["finetune"]
    """What the run trains and chooses between (`training.candidates.selection`)."""
    choose_steps: bool = True
    """False: too few validation images to choose a step count on; the selection run validates once, at its end."""

    def describe(self) -> str:
        if not self.select:
            estimate = f"; estimated {_duration(self.estimated_seconds)}" if self.estimated_seconds is not None else ""
            budget = f" of a {_duration(self.time_budget_seconds)} budget" if self.time_budget_seconds else ""
            probe = f" (probe: {self.seconds_per_step:.2f} s/step, {self.threads or '?'} thread(s))" if self.seconds_per_step else ""
            return (f"plan: {self.steps} steps of {self.batch_size} at {self.train_image_size} px on all {self.refit_images} "
                    f"labelled training images (only {self.val_images} would validate: too few to choose a step count, "
                    f"so no selection run); serving at {self.image_size} px; test split {self.test_images} images"
                    f"{estimate}{budget}{probe}" + (f"; {self.reason}" if self.reason else ""))
        refit = (f", then a refit on train+val ({self.refit_images} images) for the chosen step count scaled to it "
                 f"(<= {math.ceil(self.steps * self.refit_images / max(1, self.train_images))} steps)") if self.refit else ""
        estimate = f"; estimated {_duration(self.estimated_seconds)}" if self.estimated_seconds is not None else ""
        budget = f" of a {_duration(self.time_budget_seconds)} budget" if self.time_budget_seconds else ""
        probe = f" (probe: {self.seconds_per_step:.2f} s/step" if self.seconds_per_step is not None else ""
        probe += (f", {self.threads} thread{'s' if self.threads > 1 else ''})" if self.threads else ")") if probe else ""
        validating = (f"validating every {self.eval_every} steps on {self.val_images}" if self.choose_steps else
                      f"validating once, at the end, on {self.val_images} (too few to choose a step count on)")
        fine_tune = (f"fine-tune: {self.steps} steps of {self.batch_size} at {self.train_image_size} px on "
                     f"{self.train_images} images, {validating}{refit}; ") if "finetune" in self.candidates else ""
        probe_candidate = ("probe: a linear head on the frozen backbone, C by k-fold cross-validation on the "
                           f"{self.train_images} training images, scored on the {self.val_images} validation images; "
                           ) if "probe" in self.candidates else ""
        return (f"plan: {probe_candidate}{fine_tune}the better on validation is exported" if len(self.candidates) > 1
                else f"plan: {probe_candidate}{fine_tune}".rstrip("; ")) + (
                f"; serving at {self.image_size} px; test split {self.test_images} images{estimate}{budget}{probe}"
                + (f"; {self.reason}" if self.reason else ""))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


_SKIPPED = TypeAdapter(list[SkippedImage])
_HISTORY = TypeAdapter(list[EpochRecord])


class RunState(BaseModel):
    """Where a run stands: what a checkpoint saves, a resumed run starts from, and the result reports."""

    history: list[EpochRecord] = Field(default_factory=list)
    next_epoch: int = 0
    """Next validation interval of the current phase."""
    best_epoch: int = -1
    """Index of the best validation of the selection run."""
    best_key: tuple[float, float] = (-1.0, 0.0)
    """(validation accuracy, -validation loss) of the best validation: the larger, the better."""
    phase: Literal["select", "refit", "done"] = "select"
    """'select' (training on train, validating), 'refit' (training on train+val) or 'done'."""
    step: int = 0
    """Optimizer steps done in `phase`."""
    best_step: int = 0
    refit_steps: int = 0
    """Steps of the refit on train+val (0: no refit)."""
    selection: Selection | None = None
    """Which candidate the run exports, with each candidate's estimate (None: not chosen yet, or a run from
    before the probe candidate: the fine-tune)."""

    @property
    def epochs_without_improvement(self) -> int:
        return self.next_epoch - 1 - self.best_epoch if self.history else 0


@dataclass
class Checkpoint:
    """The state after a validation interval: enough to resume the run exactly, and to export it."""

    model: StateDict
    optimizer: StateDict
    scheduler: StateDict
    state: RunState
    labels: list[str]
    backbone: str
    config: TrainConfig

    def to_state(self) -> dict[str, Any]:
        """Plain tensors, numbers, strings, lists and dicts only: loadable with `weights_only=True`. The run
        state's fields are stored flat, `next_epoch` as `epoch` (the last finished interval), as before."""
        state = self.state.model_dump(mode="json", exclude={"next_epoch"})
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "epoch": self.state.next_epoch - 1,
            **state,
            "labels": self.labels,
            "backbone": self.backbone,
            "config": self.config.model_dump(mode="json"),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Checkpoint":
        fields = {k: state[k] for k in RunState.model_fields if k in state and k != "next_epoch"}
        return cls(
            model=state["model"],
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            state=RunState.model_validate({"phase": "done"} | fields | {"next_epoch": state["epoch"] + 1}),
            labels=list(state["labels"]),
            backbone=state["backbone"],
            config=TrainConfig.model_validate(state["config"]),
        )


def _save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def _load_torch(path: Path, map_location: str | torch.device) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2).encode("utf-8")


class RunFile:
    """A file of the run folder: `RunDir(root).splits` is the `Path` of `splits.csv` under that run's root."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, run: None, owner: type) -> "RunFile": ...

    @overload
    def __get__(self, run: "RunDir", owner: type) -> Path: ...

    def __get__(self, run: "RunDir | None", owner: type) -> "Path | RunFile":
        return self if run is None else run.root / self.name


class RunDir:
    """One training run folder (`root`): its file paths, and typed save/load for each file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------------------

    splits = RunFile("splits.csv")  # the exact train/val/test split
    skipped = RunFile("skipped.json")  # unreadable images and why
    checkpoint = RunFile("checkpoint.pt")  # last epoch: model, optimizer, scheduler, history, configuration
    plan = RunFile("plan.json")  # the `RunPlan`: steps, resolution, time estimate
    best_weights = RunFile("best.pt")  # best validation weights of the selection run
    refit_weights = RunFile("refit.pt")  # the refit's weights (train+val, the chosen step count)
    probe_weights = RunFile("probe.pt")  # the probe candidate fitted on train (what its estimate and temperature use)
    probe_refit_weights = RunFile("probe_refit.pt")  # the probe refitted on train+val (exported when it wins)
    selection = RunFile("selection.json")  # the `Selection`: the chosen candidate and every candidate's estimate
    final_weights = RunFile("model.pt")  # refit (or best) weights with the temperature folded in
    calibration = RunFile("calibration.json")  # the fitted softmax temperature
    history = RunFile("history.json")  # one `EpochRecord` per epoch
    test_report = RunFile("test_report.json")  # the held-out test `EvaluationReport`
    confusion_matrix_png = RunFile("confusion_matrix.png")  # the test confusion matrix
    evaluation_html = RunFile("evaluation.html")  # the test split's report for a person (training.html_report)
    ood_summary = RunFile("ood.json")  # the fitted OOD detector's `OODSummary` (absent: no detector)
    ood_parameters = RunFile(OOD_FILE)  # its arrays (knn reference, mahalanobis means/precision)
    artifact = RunFile("artifact")  # the exported artifact folder

    # --- state of the run ------------------------------------------------------------------------------------

    def holds_run(self) -> bool:
        """A run has written at least one epoch's checkpoint here."""
        return self.checkpoint.exists()

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def require_finished(self) -> None:
        """Raise `DataError` naming the first file a finished run has and this folder lacks."""
        for path in (self.checkpoint, self.final_weights, self.splits, self.test_report):
            if not path.exists():
                raise DataError(f"{self.root} is not a finished training run: {path.name} is missing")

    # --- the split -------------------------------------------------------------------------------------------

    def save_splits(self, splits: Splits, skipped: Sequence[SkippedImage]) -> None:
        staging = self.splits.with_name(f".{self.splits.name}.staging")
        write_csv_manifest(splits.records(), staging)  # the manifest writer takes a path, not a handle
        atomic_write_bytes(self.splits, staging.read_bytes())
        staging.unlink()
        atomic_write_bytes(self.skipped, _json_bytes([s.model_dump(mode="json") for s in skipped]))

    def load_splits(self) -> Splits:
        return split_records(read_csv_manifest(self.splits))

    def load_skipped(self) -> list[SkippedImage]:
        return _SKIPPED.validate_json(self.skipped.read_bytes())

    # --- weights and checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        _save_torch(self.checkpoint, checkpoint.to_state())

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> Checkpoint:
        return Checkpoint.from_state(_load_torch(self.checkpoint, map_location))

    def save_best_weights(self, state_dict: StateDict) -> None:
        _save_torch(self.best_weights, state_dict)

    def load_best_weights(self, map_location: str | torch.device = "cpu") -> StateDict:
        return _load_torch(self.best_weights, map_location)

    def save_refit_weights(self, state_dict: StateDict) -> None:
        _save_torch(self.refit_weights, state_dict)

    def load_refit_weights(self, map_location: str | torch.device = "cpu") -> StateDict:
        return _load_torch(self.refit_weights, map_location)

    def save_probe_weights(self, state_dict: StateDict, refit: bool = False) -> None:
        _save_torch(self.probe_refit_weights if refit else self.probe_weights, state_dict)

    def load_probe_weights(self, map_location: str | torch.device = "cpu", refit: bool = False) -> StateDict:
        return _load_torch(self.probe_refit_weights if refit else self.probe_weights, map_location)

    def save_selection(self, selection: Selection) -> None:
        atomic_write_text(self.selection, selection.model_dump_json(indent=2))

    def load_selection(self) -> Selection:
        return Selection.model_validate_json(self.selection.read_text())

    def save_plan(self, plan: "RunPlan") -> None:
        atomic_write_text(self.plan, plan.model_dump_json(indent=2))

    def load_plan(self) -> "RunPlan":
        return RunPlan.model_validate_json(self.plan.read_text())

    def save_final_weights(self, state_dict: StateDict) -> None:
        _save_torch(self.final_weights, state_dict)

    def load_final_weights(self, map_location: str | torch.device = "cpu") -> StateDict:
        return _load_torch(self.final_weights, map_location)

    # --- results ---------------------------------------------------------------------------------------------

    def save_history(self, history: Sequence[EpochRecord]) -> None:
        atomic_write_bytes(self.history, _json_bytes([h.model_dump() for h in history]))

    def load_history(self) -> list[EpochRecord]:
        return _HISTORY.validate_json(self.history.read_bytes())

    def save_calibration(self, temperature: float) -> None:
        atomic_write_bytes(self.calibration, _json_bytes({"temperature": temperature}))

    def load_calibration(self) -> float:
        return float(json.loads(self.calibration.read_text())["temperature"])

    def save_test_report(self, report: EvaluationReport) -> None:
        atomic_write_text(self.test_report, report.model_dump_json(indent=2))
        atomic_write(self.confusion_matrix_png, lambda handle: save_confusion_matrix_png(report, handle))

    def load_test_report(self) -> EvaluationReport:
        return EvaluationReport.model_validate_json(self.test_report.read_text())

    def save_ood(self, detector: OODDetector | None) -> None:
        """The detector's arrays, then its summary (the summary's presence marks a detector); None removes both."""
        self.ood_summary.unlink(missing_ok=True)
        self.ood_parameters.unlink(missing_ok=True)
        if detector is None:
            return
        written = detector.save(self.root)
        if written not in ([], [self.ood_parameters.name]):
            raise RuntimeError(f"OOD detector wrote unexpected files {written}")
        atomic_write_text(self.ood_summary, detector.summary.model_dump_json(indent=2))

    def load_ood_summary(self) -> OODSummary | None:
        """The run's OOD summary, or None for a run without a detector (older runs, `--ood-method none`)."""
        if not self.ood_summary.exists():
            return None
        return OODSummary.model_validate_json(self.ood_summary.read_text())
