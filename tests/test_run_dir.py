"""RunDir: every file of a run folder has one path, each save is read back equal, nothing half-written is
left behind, and a resumed run reads what the first run saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from training.data import DataError, ImageRecord, SkippedImage, split_records
from training.evaluate import evaluate_predictions
from training.run_dir import Checkpoint, EpochRecord, RunDir, RunState
from training.trainer import prepare_splits

LABELS = ["cat", "dog"]


def _splits(root: Path):
    records = [ImageRecord(path=root / f"{label}{i}.png", label=label) for label in LABELS for i in range(10)]
    return split_records(records, 0.2, 0.2, seed=0)


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, trainable_groups=1, train_loss=1.0 / (epoch + 1), train_accuracy=0.5,
                       val_loss=0.9, val_accuracy=0.6, val_macro_f1=0.55, seconds=1.5, train_images_per_second=10.0)


def test_every_run_file_has_its_path_in_the_run_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    paths = {
        run.splits: "splits.csv", run.skipped: "skipped.json", run.checkpoint: "checkpoint.pt",
        run.best_weights: "best.pt", run.refit_weights: "refit.pt", run.plan: "plan.json", run.final_weights: "model.pt", run.calibration: "calibration.json",
        run.history: "history.json", run.test_report: "test_report.json",
        run.confusion_matrix_png: "confusion_matrix.png", run.artifact: "artifact",
    }  # fmt: skip
    assert all(path == run.root / name for path, name in paths.items())
    assert not run.holds_run()


def test_every_file_saved_is_read_back_equal(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    splits = _splits(tmp_path)
    skipped = [SkippedImage(path=tmp_path / "bad.jpg", reason="truncated")]
    run.save_splits(splits, skipped)
    assert run.load_splits() == split_records([r.model_copy(update={"path": r.path.resolve()}) for r in splits.records()])
    assert run.load_skipped() == skipped

    weights = {"head.weight": torch.arange(6.0).reshape(2, 3)}
    checkpoint = Checkpoint(
        model=weights, optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, scheduler={"last_epoch": 3},
        state=RunState(next_epoch=2, best_epoch=0, best_key=(0.75, -0.5), history=[_record(0), _record(1)]),
        labels=LABELS, backbone="efficientnet_lite0", config=tiny_config(tmp_path, run.root),
    )  # fmt: skip
    run.save_checkpoint(checkpoint)
    assert run.holds_run()
    loaded = run.load_checkpoint()
    assert torch.equal(loaded.model["head.weight"], weights["head.weight"])
    assert (loaded.optimizer, loaded.scheduler) == (checkpoint.optimizer, checkpoint.scheduler)
    assert loaded.state == checkpoint.state and (loaded.state.next_epoch, loaded.state.best_key) == (2, (0.75, -0.5))
    assert (loaded.labels, loaded.config) == (LABELS, checkpoint.config)
    assert torch.load(run.checkpoint, weights_only=True)["epoch"] == 1  # the on-disk format other code reads

    run.save_best_weights(weights)
    run.save_final_weights({"head.weight": weights["head.weight"] / 2})
    assert torch.equal(run.load_best_weights()["head.weight"], weights["head.weight"])
    assert torch.equal(run.load_final_weights()["head.weight"], weights["head.weight"] / 2)

    run.save_history(checkpoint.state.history)
    run.save_calibration(1.25)
    report = evaluate_predictions(np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 1], LABELS)
    run.save_test_report(report)
    assert run.load_history() == checkpoint.state.history and run.load_calibration() == 1.25
    assert run.load_test_report() == report
    assert run.confusion_matrix_png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith(".")) == [], "no temp file left behind"
    run.require_finished()


def test_an_unfinished_run_names_what_is_missing(tmp_path):
    run = RunDir(tmp_path)
    run.save_splits(_splits(tmp_path), [])
    with pytest.raises(DataError, match="checkpoint.pt is missing"):
        run.require_finished()


def test_resume_reads_the_saved_split_not_the_data(digits_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    first, skipped = prepare_splits(tiny_config(digits_dir, run.root), run)
    assert run.splits.exists() and run.skipped.exists() and skipped == []
    gone = tmp_path / "data-moved-away"
    resumed, resumed_skipped = prepare_splits(tiny_config(gone, run.root, resume=True), run)
    assert resumed == split_records(first.records()) and resumed_skipped == []
