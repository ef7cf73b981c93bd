"""The serve path does each thing once, in the place that owns it (issue 21, item 7): `transfer-serve serve` resolves
the device and loads the model before BentoML starts (a missing GPU is one `error:` line, not a worker crash
loop) and hands the workers what it resolved; a worker's start reads the manifest and checks the inference
combination once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
import models.artifact
import models.inference


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The environments `serve` would have started BentoML with (`os.execve` is recorded, not run)."""
    environments: list[dict[str, str]] = []

    def execve(path, args, env):
        environments.append(dict(env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    return environments


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"check_combination": 0, "read_manifest": 0}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(models.inference, "check_combination")
    counting(models.artifact, "read_manifest")
    return counts


def serve(artifact: Path, *options: str):
    return CliRunner().invoke(cli.app, ["serve", str(artifact), "--port", "9", *options])


def test_serve_without_a_gpu_for_device_cuda_is_one_error_line(artifact_dir: Path, started: list,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.inference, "cuda_is_available", lambda: False)
    result = serve(artifact_dir, "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == ["error: device 'cuda' was asked for, but no CUDA GPU is available"]
    assert started == []


@pytest.mark.parametrize(("options", "expected"), [((), ("onnx", "cpu")), (("--runtime", "torchscript"), ("torchscript", "cpu"))])
def test_serve_hands_the_workers_what_it_resolved(artifact_dir: Path, started: list, counted: dict,
                                                  monkeypatch: pytest.MonkeyPatch, options, expected) -> None:
    monkeypatch.setattr(models.inference, "cuda_is_available", lambda: False)
    result = serve(artifact_dir, *options)
    assert result.exit_code == 0, result.output
    (env,) = started
    assert (env["TRANSFER_SERVE_RUNTIME"], env["TRANSFER_SERVE_DEVICE"]) == expected
    assert env["TRANSFER_SERVE_ARTIFACT"] == str(artifact_dir.resolve())
    assert counted == {"check_combination": 1, "read_manifest": 1}


def test_a_worker_start_reads_the_manifest_and_checks_the_combination_once(artifact_dir: Path, counted: dict) -> None:
    """What service/service.py does in each worker: settings at import, the artifact at import, the model in
    `__init__` (the module itself is imported by BentoML only, so its steps are run here in the same order)."""
    from service.loading import load_predictor, open_artifact, served_artifact
    from service.settings import ServiceSettings

    settings = ServiceSettings.from_env({"TRANSFER_SERVE_ARTIFACT": str(artifact_dir), "TRANSFER_SERVE_RUNTIME": "onnx",
                                         "TRANSFER_SERVE_DEVICE": "cpu"})  # fmt: skip
    artifact = served_artifact(settings)
    predictor = load_predictor(settings, artifact or open_artifact(settings, None))
    assert predictor.inference is not None and predictor.inference.runtime == "onnx"
    assert counted == {"check_combination": 1, "read_manifest": 1}
