import json

import pytest
import torch

import training.loop as loop
import training.trainer as trainer
from models.artifact import load_artifact
from conftest import CORRUPT_IMAGE, tiny_config
from training.data import DataError


def test_run_produces_metrics_checkpoints_and_artifact(trained_run):
    run = trained_run.run_dir
    for name in ("checkpoint.pt", "best.pt", "refit.pt", "model.pt", "calibration.json", "splits.csv", "history.json",
                 "test_report.json", "confusion_matrix.png", "plan.json", "evaluation.html"):
        assert (run / name).exists(), name
    assert len(trained_run.history) == 2  # steps=4, validated every 2
    assert [h.step for h in trained_run.history] == [2, 4]
    assert trained_run.test.images == len([l for l in (run / "splits.csv").read_text().splitlines() if l.endswith(",test")])
    manifest = load_artifact(trained_run.artifact).manifest
    assert manifest.labels == ["0", "1", "2", "3"]
    assert manifest.metrics["test_accuracy"] == pytest.approx(trained_run.test.accuracy)
    assert manifest.preprocessing.image_size == 32


def test_exported_weights_are_refit_weights_with_temperature_folded_in(trained_run):
    temperature = json.loads((trained_run.run_dir / "calibration.json").read_text())["temperature"]
    refit = torch.load(trained_run.run_dir / "refit.pt", weights_only=True)
    final = torch.load(trained_run.run_dir / "model.pt", weights_only=True)
    assert trained_run.refit_steps > 0
    assert torch.allclose(final["head.1.weight"], refit["head.1.weight"] / temperature)
    assert torch.equal(final["backbone.body.conv_stem.weight"], refit["backbone.body.conv_stem.weight"])


def test_without_refit_the_best_selection_weights_are_exported(digits_dir, tmp_path):
    result = trainer.train(tiny_config(digits_dir, tmp_path / "r", refit=False, export=False), show_progress=False)
    temperature = json.loads((result.run_dir / "calibration.json").read_text())["temperature"]
    best = torch.load(result.run_dir / "best.pt", weights_only=True)
    final = torch.load(result.run_dir / "model.pt", weights_only=True)
    assert result.refit_steps == 0 and not (result.run_dir / "refit.pt").exists()
    assert torch.allclose(final["head.1.weight"], best["head.1.weight"] / temperature)
    assert torch.equal(final["backbone.body.conv_stem.weight"], best["backbone.body.conv_stem.weight"])


def test_corrupt_image_is_skipped_and_reported(trained_run):
    assert [s.path.name for s in trained_run.skipped] == [CORRUPT_IMAGE]
    reported = json.loads((trained_run.run_dir / "skipped.json").read_text())
    assert reported[0]["path"].endswith(CORRUPT_IMAGE) and reported[0]["reason"]


def test_checkpoint_loads_with_weights_only(trained_run):
    state = torch.load(trained_run.run_dir / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "done" and state["labels"] == ["0", "1", "2", "3"]
    assert state["best_step"] in (2, 4) and state["refit_steps"] >= state["best_step"]


def test_resume_after_interrupt_equals_uninterrupted_run(digits_dir, tmp_path, monkeypatch):
    options = dict(steps=6, eval_every=2, export=False, strategy="gradual")
    trainer.train(tiny_config(digits_dir, tmp_path / "clean", **options), show_progress=False)

    real_count = loop.trainable_group_count

    def interrupt_at_third_interval(strategy, epoch, epochs, groups):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_count(strategy, epoch, epochs, groups)

    monkeypatch.setattr(loop, "trainable_group_count", interrupt_at_third_interval)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_config(digits_dir, tmp_path / "resumed", **options), show_progress=False)
    interrupted = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (interrupted["epoch"], interrupted["phase"], interrupted["step"]) == (1, "select", 4)

    monkeypatch.setattr(loop, "trainable_group_count", real_count)
    result = trainer.train(tiny_config(digits_dir, tmp_path / "resumed", resume=True, **options), show_progress=False)
    assert [h.epoch for h in result.history] == [0, 1, 2]
    assert result.history[0].seconds == interrupted["history"][0]["seconds"], "finished intervals must not rerun"
    clean_state = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    resumed_state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert clean_state["phase"] == resumed_state["phase"] == "done"
    assert clean_state["refit_steps"] == resumed_state["refit_steps"] > 0
    clean, resumed = clean_state["model"], resumed_state["model"]
    assert all(torch.allclose(clean[k].float(), resumed[k].float(), atol=1e-6) for k in clean)


def test_resume_during_the_refit_equals_uninterrupted_run(digits_dir, tmp_path, monkeypatch):
    options = dict(steps=6, eval_every=3, export=False)
    clean = trainer.train(tiny_config(digits_dir, tmp_path / "clean", **options), show_progress=False)
    assert clean.refit_steps > 3, "the refit must span more than one interval for this test"

    real_step = loop.train_step

    def interrupt_in_refit(config, setup, data, step, phase_seed):
        if phase_seed == loop.REFIT_SEED:
            if step == 3:
                raise KeyboardInterrupt
        return real_step(config, setup, data, step, phase_seed)

    monkeypatch.setattr(loop, "train_step", interrupt_in_refit)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_config(digits_dir, tmp_path / "resumed", **options), show_progress=False)
    interrupted = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (interrupted["phase"], interrupted["step"]) == ("refit", 3)
    monkeypatch.setattr(loop, "train_step", real_step)
    trainer.train(tiny_config(digits_dir, tmp_path / "resumed", resume=True, **options), show_progress=False)
    a = torch.load(tmp_path / "clean" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_existing_run_is_not_overwritten(trained_run, training_data):
    with pytest.raises(DataError, match="--resume"):
        trainer.train(tiny_config(training_data, trained_run.run_dir), show_progress=False)


def test_resume_without_checkpoint_is_an_error(digits_dir, tmp_path):
    with pytest.raises(DataError, match="no checkpoint"):
        trainer.train(tiny_config(digits_dir, tmp_path / "new", resume=True), show_progress=False)
