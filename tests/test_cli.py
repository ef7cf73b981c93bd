import json

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def _fails_cleanly(result, message):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_train_with_missing_data_fails_cleanly(tmp_path):
    _fails_cleanly(runner.invoke(app, ["train", "--data", str(tmp_path / "nope")]), "expected an image folder")


def test_train_with_unknown_strategy_fails_cleanly(tmp_path, digits_dir):
    result = runner.invoke(app, ["train", "--data", str(digits_dir), "--strategy", "magic", "--output", str(tmp_path)])
    _fails_cleanly(result, "strategy")


def test_train_with_unknown_backbone_fails_cleanly(tmp_path, digits_dir):
    result = runner.invoke(app, ["train", "--data", str(digits_dir), "--backbone", "vgg1", "--output", str(tmp_path / "r")])
    _fails_cleanly(result, "unknown backbone")


def test_evaluate_refuses_a_non_artifact(tmp_path, digits_dir):
    _fails_cleanly(runner.invoke(app, ["evaluate", str(tmp_path), "--data", str(digits_dir)]), "manifest.json is missing")


def test_demo_data_writes_the_digits(tmp_path):
    result = runner.invoke(app, ["demo-data", str(tmp_path / "digits")])
    assert result.exit_code == 0
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [str(d) for d in range(10)]


def test_evaluate_held_out_split_matches_training_report(trained_run, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        ["evaluate", str(trained_run.artifact), "--data", str(trained_run.run_dir / "splits.csv"), "--split", "test",
         "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == trained_run.test.images
    assert report["accuracy"] == pytest.approx(trained_run.test.accuracy, abs=1.0 / report["images"] + 1e-9)
    assert (out / "confusion_matrix.png").exists()
    page = (out / "evaluation.html").read_text()
    assert 'id="mistakes"' in page and 'id="calibration"' in page and f"{report['images']} images" in page


def test_export_command_reexports_a_run(trained_run, tmp_path):
    out = tmp_path / "again"
    result = runner.invoke(app, ["export", str(trained_run.run_dir), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()
    _fails_cleanly(runner.invoke(app, ["export", str(trained_run.run_dir), "--output", str(out)]), "already exists")


def test_every_training_option_has_a_flag_that_reaches_the_config(tmp_path, digits_dir, monkeypatch):
    """`train`'s flags are generated from TrainConfig: each field has one, and what is given is what trains."""
    import typer.main

    import training.trainer
    from training.config import TrainConfig

    command = typer.main.get_command(app).commands["train"]
    flags = {p.name: p.opts for p in command.params}
    assert set(TrainConfig.model_fields) <= set(flags), set(TrainConfig.model_fields) - set(flags)
    assert flags["min_val_images"] == ["--min-val-images"]

    seen = {}

    def capture(config, show_progress=True):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(training.trainer, "train", capture)
    args = ["train", "--data", str(digits_dir), "--output", str(tmp_path / "r"), "--min-val-images", "7",
            "--time-budget", "90s", "--no-refit", "--strategy", "gradual", "--test-fraction", "0.2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    config = seen["config"]
    assert (config.min_val_images, config.time_budget, config.refit, config.strategy, config.test_fraction) == (
        7, 90.0, False, "gradual", 0.2)
    assert TrainConfig(data=digits_dir, output=tmp_path).time_budget == 300.0  # "5m", parsed once


def test_train_with_timm_weights_unavailable_offline_fails_cleanly(tmp_path, digits_dir, monkeypatch):
    """A timm name resolves (its preprocessing comes from timm's pretrained config) but its weights are neither in
    the Hugging Face cache nor downloadable: one error line saying so and what to do, no traceback."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    result = runner.invoke(app, ["train", "--data", str(digits_dir), "--backbone", "timm/resnet10t", "--steps", "1",
                                 "--time-budget", "none", "--output", str(tmp_path / "r")])
    _fails_cleanly(result, "not available offline")
    assert "--weights FILE" in result.output
