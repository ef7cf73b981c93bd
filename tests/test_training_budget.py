"""The schedule is sized by the data, splits do not waste labels, the time budget bounds a run, and the report
says how many images its estimate rests on and with what interval."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from conftest import TINY, tiny_config
from training.config import LEGACY_OPTIONS, TrainConfig, parse_duration
from training.data import ImageRecord, split_records
from training.evaluate import wilson_interval
from training.run_dir import RunDir


def _config(**overrides) -> TrainConfig:
    return TrainConfig(data=Path("d"), output=Path("o"), **overrides)


@pytest.mark.parametrize(
    "train_images, steps",
    [
        (14, 200),  # 10 epochs of 14 images = 10 steps: raised to min_steps
        (200, 200),  # 10 x 200 / 32 = 63 -> 200
        (700, 219),  # ceil(10 x 700 / 32)
        (2000, 300),  # 625 -> capped at max_steps
        (5000, 300),
    ],
)
def test_step_budget_is_clamped_epochs_of_the_data(train_images, steps):
    config = _config()
    assert config.budget_steps(train_images) == steps == min(300, max(200, math.ceil(10 * train_images / 32)))
    assert config.evaluation_interval(steps, train_images) == math.ceil(steps / 10)


def test_explicit_steps_and_legacy_epochs():
    assert _config(steps=40).budget_steps(5000) == 40
    legacy = _config(**LEGACY_OPTIONS)
    assert legacy.budget_steps(171) == 8 * 6  # 8 epochs of ceil(171 / 32) batches
    assert legacy.evaluation_interval(48, 171) == 6  # validated once an epoch


def test_default_training_side_is_fixres_lower_and_never_above_serving():
    assert _config().default_train_image_size() == 160  # lite0 serves at 224
    assert _config(image_size=128).default_train_image_size() == 128
    assert _config(image_size=32).default_train_image_size() == 32


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    assert parse_duration("none") is None and parse_duration("45") == 45
    with pytest.raises(ValueError):
        parse_duration("5 minutes")


def _records(per_class: int, classes: int = 2) -> list[ImageRecord]:
    return [ImageRecord(path=Path(f"/x/{c}/{i}.png"), label=str(c)) for c in range(classes) for i in range(per_class)]


def test_small_data_has_no_test_split_and_a_small_stratified_validation():
    splits = split_records(_records(10), test_fraction=None)  # 10-shot, 2 classes
    assert len(splits.test) == 0
    assert len(splits.val) == 3 and len(splits.train) == 17  # ceil(0.15 x 20)
    splits = split_records(_records(20, classes=10), test_fraction=None)  # 20 per class, 10 classes
    assert len(splits.test) == 0 and len(splits.val) == 30
    assert set(Counter(r.label for r in splits.val).values()) == {3}
    splits = split_records(_records(2, classes=10), test_fraction=None)  # one validation image per class
    assert len(splits.val) == 10 and set(Counter(r.label for r in splits.train).values()) == {1}


def test_large_data_holds_out_a_test_split():
    splits = split_records(_records(400, classes=5), test_fraction=None)  # 2,000 images
    assert len(splits.test) == 300 and len(splits.val) == 300 and len(splits.train) == 1400
    assert len(split_records(_records(400, classes=5), test_fraction=0).test) == 0


def test_a_given_test_split_is_kept_and_the_rest_split_into_train_and_val():
    records = _records(20) + [r.model_copy(update={"split": "test", "path": Path(f"/t/{i}.png")})
                              for i, r in enumerate(_records(5))]
    splits = split_records(records, test_fraction=None)
    assert len(splits.test) == 10 and len(splits.val) == 6 and len(splits.train) == 34


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(153, 153)[1] == 1.0 and wilson_interval(153, 153)[0] == pytest.approx(0.9755, abs=1e-4)


def test_report_carries_image_count_and_interval(trained_run):
    report = json.loads((trained_run.run_dir / "test_report.json").read_text())
    assert report["source"] == "test" and report["images"] == trained_run.test.images > 0
    low, high = report["accuracy_ci95"]
    assert low <= report["accuracy"] <= high
    from models.artifact import load_artifact

    manifest = load_artifact(trained_run.artifact).manifest
    assert manifest.metrics["test_images"] == report["images"]
    assert manifest.metrics["test_accuracy_ci95_low"] == pytest.approx(low)
    assert manifest.parity.top1_agreement == 1.0  # exported from the refit, parity checked


def test_too_small_to_hold_anything_out_the_cli_says_so(digits_dir, tmp_path):
    out = tmp_path / "run"  # 60 images: no test split, 9 validation images (< 50): the fine-tune alone has no selection run
    args = ["train", "--data", str(digits_dir), "--output", str(out), "--weights", "none", "--image-size", "32",
            "--steps", "2", "--batch-size", "16", "--workers", "0", "--time-budget", "none", "--threads", "1",
            "--no-horizontal-flip", "--candidate", "finetune"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "no held-out estimate" in result.output and "too few" in result.output
    report = json.loads((out / "test_report.json").read_text())
    assert report["source"] == "none" and report["images"] == 0 and report["accuracy_ci95"] == [0.0, 1.0]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["select"] is False and plan["refit_images"] == 60 and plan["steps"] == 2
    assert not (out / "best.pt").exists() and (out / "refit.pt").exists()
    metrics = json.loads((out / "artifact" / "manifest.json").read_text())["metrics"]
    assert metrics == {"held_out_images": 0.0, "best_val_accuracy": 0.0}


def test_without_a_test_split_the_validation_estimate_is_reported_with_its_interval(digits_dir, tmp_path):
    from training.trainer import train

    result = train(tiny_config(digits_dir, tmp_path / "run", test_fraction=0, steps=2, eval_every=1, export=False),
                   show_progress=False)
    report = json.loads((result.run_dir / "test_report.json").read_text())
    assert report["source"] == "validation" and report["images"] == 9 and "no test split" in report["note"]
    low, high = report["accuracy_ci95"]
    assert low <= report["accuracy"] <= high and high - low > 0.2  # 9 images say little, and the interval says so


def test_time_budget_bounds_a_small_run(digits_dir, tmp_path):
    from training.trainer import train

    budget = 40
    options = {k: v for k, v in TINY.items() if k not in ("steps", "eval_every")}
    config = TrainConfig(data=digits_dir, output=tmp_path / "run", **(options | dict(time_budget=f"{budget}s", export=False)))
    started = time.perf_counter()
    result = train(config, show_progress=False)
    wall = time.perf_counter() - started
    plan = RunDir(result.run_dir).load_plan()
    assert plan.time_budget_seconds == budget and plan.seconds_per_step and plan.seconds_per_step > 0
    assert plan.budget_steps == 200 and plan.estimated_seconds is not None
    if plan.steps < plan.budget_steps:
        assert "time budget" in plan.reason
    assert wall < 3 * budget, f"{wall:.0f} s for a {budget} s budget (plan: {plan.describe()})"
