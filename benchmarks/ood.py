"""Out-of-distribution detection: every candidate score of models/ood.py measured on real trained runs.

    python benchmarks/ood.py                      # three training runs (~10 min on 2 cores), then the table
    python benchmarks/ood.py --quick              # seconds: tiny random-init runs, for CI (numbers meaningless)

Runs (each `training.trainer.train` with the default strategy, ImageNet weights, seed 0; cached in --work):
  digits10   all 10 digit classes, 128 px, no flips          ID test = its test split
  digits8    digit classes 0-7 only, 128 px, no flips         near OOD = every image of digits 8 and 9
  hymenoptera  ants/bees photos at 160 px; train = train/, the val/ folder split (stratified, seed 0)
               into the run's val and test halves              (/work/shared/datasets/hymenoptera by default)
OOD sets: far = hymenoptera photos for the digits models, the digits test images for the hymenoptera model;
faces = scikit-image's 200 LFW faces (25x25 grey) for all; photos = crops of 16 bundled natural photographs
(scikit-image/scikit-learn samples: a cat, a rocket, coffee, ...) for the hymenoptera model, the nearest
thing to "other photographs" available offline (a 2-class model has no class to leave out).

Every detector is fitted on the run's validation split (outputs of the exported artifact, i.e. what the
service sees), thresholded at --target-rejection of the validation images, and measured on the test split
(ID) against each OOD set: AUROC and FPR at 95% TPR (positives = OOD) and the flagged shares at the threshold.
Part 2 times `OODDetector.score` on a batch of 32 against the artifact's forward pass on the same batch.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, table, timed  # noqa: E402

HYMENOPTERA = Path("/work/shared/datasets/hymenoptera")
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "motorcycle_left", "motorcycle_right",
                  "hubble_deep_field", "retina", "grass", "gravel", "brick", "coins", "moon")


# ----------------------------------------------------------------------------------------------- data
def write_digits(work: Path, per_class: int | None) -> tuple[Path, Path, Path]:
    """digits10 folder, digits8 folder (classes 0-7) and a folder with the images of classes 8 and 9."""
    from training.demo_data import write_digits_folder

    all_digits = work / "data" / "digits10"
    if not all_digits.exists():
        write_digits_folder(all_digits, classes=10, per_class=per_class)
    eight = work / "data" / "digits8"
    held_out = work / "data" / "digits_8_9"
    if not eight.exists():
        for digit in range(10):
            target = (eight if digit < 8 else held_out) / str(digit)
            target.mkdir(parents=True, exist_ok=True)
            for image in (all_digits / str(digit)).iterdir():
                os.symlink(image, target / image.name)
    return all_digits, eight, held_out


def write_hymenoptera_csv(work: Path, source: Path, quick: bool) -> Path:
    """train/ as the training split; val/ halved (stratified, seed 0) into val and test; nothing copied."""
    from sklearn.model_selection import train_test_split

    path = work / "data" / "hymenoptera.csv"
    if path.exists():
        return path
    rows = []
    for split_dir in ("train", "val"):
        for label in ("ants", "bees"):
            images = sorted((source / split_dir / label).glob("*.jpg"))
            if quick:
                images = images[:8]
            rows += [(str(p), label, split_dir) for p in images]
    held = [r for r in rows if r[2] == "val"]
    val, test = train_test_split(held, test_size=0.5, stratify=[r[1] for r in held], random_state=0)
    rows = [r for r in rows if r[2] == "train"] + [(p, l, "val") for p, l, _ in val] + [(p, l, "test") for p, l, _ in test]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def photo_crops(count_per_photo: int, seed: int = 0) -> list:
    """Random square crops (a quarter to all of the short side) of bundled natural photographs, as RGB PIL images."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(data, name)() for name in SKIMAGE_PHOTOS] + list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    crops = []
    for array in arrays:
        image = Image.fromarray(array).convert("RGB")
        short = min(image.size)
        for _ in range(count_per_photo):
            side = int(rng.uniform(0.25, 1.0) * short)
            left = int(rng.integers(0, image.size[0] - side + 1))
            top = int(rng.integers(0, image.size[1] - side + 1))
            crops.append(image.crop((left, top, left + side, top + side)))
    return crops


def lfw_faces(limit: int | None = None) -> list:
    from PIL import Image
    from skimage import data

    faces = data.lfw_subset()  # (200, 25, 25) float in [0, 1]
    images = [Image.fromarray((f * 255).round().astype(np.uint8), mode="L").convert("RGB") for f in faces]
    return images[:limit] if limit else images


# ------------------------------------------------------------------------------------------- training
def run_settings(quick: bool) -> dict[str, dict]:
    if quick:
        tiny = dict(weights="none", image_size=32, epochs=1, batch_size=16, workers=0, horizontal_flip=False)
        return {"digits10": tiny, "digits8": tiny, "hymenoptera": tiny}
    digits = dict(image_size=128, epochs=8, batch_size=32, workers=1, horizontal_flip=False)
    return {"digits10": digits, "digits8": digits,
            "hymenoptera": dict(image_size=160, epochs=6, batch_size=32, workers=1)}


def train_run(name: str, data: Path, work: Path, settings: dict) -> tuple[Path, float]:
    """Train (or reuse) one run; returns its artifact and the training wall seconds (0 when reused)."""
    from training.config import TrainConfig
    from training.trainer import train

    output = work / "runs" / name
    if (output / "artifact" / "manifest.json").exists():
        return output / "artifact", 0.0
    started = time.perf_counter()
    result = train(TrainConfig(data=data, output=output, **settings), show_progress=False)
    seconds = time.perf_counter() - started
    print(f"trained {name}: test accuracy {result.test.accuracy:.4f}, best epoch {result.best_epoch}, "
          f"{seconds:.0f} s", flush=True)
    return result.artifact, seconds
