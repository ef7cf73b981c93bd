"""Shared fixtures: a small real dataset (digits) and one tiny trained run + artifact for the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.demo_data import write_digits_folder

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(backbone="efficientnet_lite0", weights="none", image_size=32, train_image_size=32, steps=4, eval_every=2,
            batch_size=16, workers=0, horizontal_flip=False, patience=5, test_fraction=0.15, time_budget="none",
            threads=1, min_val_images=1, candidate="finetune")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 15 real digit images."""
    folder = tmp_path_factory.mktemp("data") / "digits"
    write_digits_folder(folder, classes=4, per_class=15)
    return folder


def tiny_config(data: Path, output: Path, **overrides) -> TrainConfig:
    return TrainConfig(data=data, output=output, **(TINY | overrides))


CORRUPT_IMAGE = "corrupt.jpg"


@pytest.fixture(scope="session")
def training_data(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits plus one corrupt file that training must skip and report."""
    folder = tmp_path_factory.mktemp("data") / "digits_with_corrupt"
    shutil.copytree(digits_dir, folder)
    (folder / "0" / CORRUPT_IMAGE).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return folder


@pytest.fixture(scope="session")
def trained_run(training_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from training.trainer import train

    return train(tiny_config(training_data, tmp_path_factory.mktemp("runs") / "tiny"), show_progress=False)


@pytest.fixture(scope="session")
def artifact_dir(trained_run) -> Path:
    return trained_run.artifact


@pytest.fixture(scope="session")
def reliability_server(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real server (the limits of test_service.SERVER_ENV) shared by the fuzz, hostile-image and soak tests."""
    from test_service import SERVER_ENV, running_server

    with running_server(artifact_dir, tmp_path_factory.mktemp("reliability_home"), **SERVER_ENV) as client:
        yield client
