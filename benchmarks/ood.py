"""Out-of-distribution detection: every candidate score of models/ood.py measured on real trained runs.

    python benchmarks/ood.py                      # three training runs (minutes each on 2 cores), then the tables
    python benchmarks/ood.py --quick              # seconds: tiny random-init runs, for CI (numbers meaningless)

Runs (each `training.trainer.train` with the default strategy, ImageNet weights, seed 0, 3 epochs; cached in --work):
  digits10   all 10 digit classes, 64 px, no flips           ID test = its test split
  digits8    digit classes 0-7 only, 64 px, no flips          near OOD = every image of digits 8 and 9
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

    python benchmarks/ood.py --overhead ARTIFACT  # only: Predictor.predict_batch with vs without its detector

`--overhead` times what /classify and the batch job run per batch, `Predictor.predict_batch` (forward pass,
softmax, OOD score), with the artifact's own detector, with a largest-size kNN reference (2,048 rows), and
without any detector, in interleaved rounds so machine load hits all three alike.
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
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera",
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
    # every run holds out a validation split (the detector is fitted on it) and a test split (it is scored on it),
    # whatever the training defaults decide for small data
    splits = dict(test_fraction=0.15, min_val_images=1)
    if quick:
        tiny = dict(weights="none", image_size=32, train_image_size=32, steps=4, eval_every=2, batch_size=16,
                    workers=0, horizontal_flip=False, time_budget="none", threads=1) | splits
        return {"digits10": tiny, "digits8": tiny, "hymenoptera": tiny}
    # Sized for a shared 2-core machine (each run a few minutes): smaller than the demo's 128 px / 8 epochs.
    digits = dict(image_size=64, epochs=3, batch_size=32, workers=1, horizontal_flip=False) | splits
    return {"digits10": digits, "digits8": digits,
            "hymenoptera": dict(image_size=160, epochs=3, batch_size=32, workers=1) | splits}


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


# -------------------------------------------------------------------------------------------- outputs
def artifact_outputs(predictor, images: list, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of the exported model, batch by batch, exactly as the service runs it."""
    logits, embeddings = [], []
    for start in range(0, len(images), batch_size):
        batch_logits, batch_embeddings = predictor.runtime(predictor.preprocess(images[start:start + batch_size]))
        logits.append(batch_logits.astype(np.float32))
        embeddings.append(batch_embeddings.astype(np.float32))
    return np.concatenate(logits), np.concatenate(embeddings)


def split_images(run_dir: Path, split: str, labels: list[str] | None = None) -> tuple[list, np.ndarray]:
    """A run's split (from its splits.csv) as images and class indices in `labels` order (-1 without labels)."""
    from models.decoding import load_image
    from training.data import read_csv_manifest, split_records

    records = getattr(split_records(read_csv_manifest(run_dir / "splits.csv")), split)
    index = {label: i for i, label in enumerate(labels or [])}
    return [load_image(r.path) for r in records], np.array([index.get(r.label, -1) for r in records])


def folder_images(folder: Path, limit: int | None = None) -> list:
    from models.decoding import load_image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [load_image(p) for p in paths[:limit]]


# ------------------------------------------------------------------------------------------ measuring
CANDIDATES: list[tuple[str, str, dict]] = [
    ("msp", "msp", {}),
    ("energy", "energy", {}),
    ("mahalanobis (raw)", "mahalanobis", {"normalize": False}),
    ("mahalanobis (L2)", "mahalanobis", {"normalize": True}),
    ("knn k=1", "knn", {"k": 1}),
    ("knn k=5", "knn", {"k": 5}),
    ("knn k=10", "knn", {"k": 10}),
]


def measure(protocols: list[dict], target: float) -> list[list[object]]:
    from models.ood import OODDetector, OODError, evaluate_ood

    rows = []
    for p in protocols:
        for label, method, options in CANDIDATES:
            try:
                detector = OODDetector.fit(method, *p["val"], target_rejection=target, **options)
            except OODError as exc:  # e.g. too few validation images per class (--quick)
                rows += [[p["name"], ood_name, label, "n/a", str(exc)[:60], "", "", ""] for ood_name in p["ood"]]
                continue
            id_scores = detector.score(*p["test"][:2])
            for ood_name, (logits, embeddings) in p["ood"].items():
                result = evaluate_ood(id_scores, detector.score(logits, embeddings), detector.threshold)
                rows.append([p["name"], ood_name, label, f"{result.auroc:.4f}", f"{result.fpr_at_95_tpr:.3f}",
                             f"{result.flagged_share_id:.3f}", f"{result.flagged_share_ood:.3f}",
                             f"{len(id_scores)}/{len(logits)}"])
    return rows


def scoring_cost(artifact: Path, protocol: dict, batch: int, min_seconds: float) -> list[list[object]]:
    """Median ms of the artifact's forward pass on `batch` preprocessed images vs each detector's score()."""
    from common import percentile
    from models.ood import OODDetector, OODError
    from models.predictor import Predictor

    predictor = Predictor.from_artifact(artifact)
    images = (protocol["test_images"] * (batch // max(1, len(protocol["test_images"])) + 1))[:batch]
    pixels = predictor.preprocess(images)
    forward = percentile(timed(lambda: predictor.runtime(pixels), 3, min_seconds), 50)
    logits, embeddings = predictor.runtime(pixels)
    rows = [["forward pass (" + type(predictor.runtime).__name__ + ")", f"{forward * 1e3:.1f}", "100%"]]
    for label, method, options in CANDIDATES:
        try:
            detector = OODDetector.fit(method, *protocol["val"], **options)
        except OODError:
            continue
        cost = percentile(timed(lambda: detector.score(logits, embeddings), 5, min_seconds / 4), 50)
        rows.append([f"score: {label}", f"{cost * 1e3:.2f}", f"{100 * cost / forward:.1f}%"])
    return rows


def predictor_overhead(artifact: Path, batch: int, rounds: int = 15, calls: int = 5) -> list[list[object]]:
    """Median ms per `predict_batch` of `batch` images: no detector, the artifact's, and a 2,048-row kNN one."""
    from common import percentile
    from models.ood import DEFAULT_MAX_REFERENCE, OODDetector
    from models.predictor import Predictor

    predictor = Predictor.from_artifact(artifact)
    if predictor.ood is None:
        raise SystemExit(f"{artifact} has no OOD detector")
    rng = np.random.default_rng(0)
    size = predictor.manifest.preprocessing.image_size
    pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    dim, classes = predictor.manifest.embedding_dim, predictor.manifest.num_classes
    largest = OODDetector.fit("knn", rng.normal(size=(DEFAULT_MAX_REFERENCE + 1, classes)),
                              rng.normal(size=(DEFAULT_MAX_REFERENCE + 1, dim)),
                              np.arange(DEFAULT_MAX_REFERENCE + 1) % classes)
    variants = {"no detector": None, f"artifact's {predictor.ood.method} "
                f"({predictor.ood.summary.n_reference or 0} reference rows)": predictor.ood,
                f"knn, {largest.summary.n_reference} reference rows": largest}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, detector in variants.items():
            predictor.ood = detector
            times[name] += timed(lambda: predictor.predict_batch(pixels), calls, 0.0)
    base = percentile(times["no detector"], 50)
    return [[name, f"{percentile(t, 50) * 1e3:.1f}", f"{100 * (percentile(t, 50) / base - 1):+.1f}%"]
            for name, t in times.items()]


def main(argv: list[str] | None = None) -> tuple[list[list[object]], list[list[object]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("ood-benchmark"), help="data, runs and cached outputs")
    parser.add_argument("--hymenoptera", type=Path, default=HYMENOPTERA)
    parser.add_argument("--target-rejection", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=32, help="batch size of the scoring-cost comparison")
    parser.add_argument("--quick", action="store_true", help="tiny random-init runs: checks the script, not OOD")
    parser.add_argument("--overhead", type=Path, help="only time predict_batch with/without ARTIFACT's detector")
    args = parser.parse_args(argv)
    if args.overhead is not None:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        rows = predictor_overhead(args.overhead, args.batch)
        print(f"Predictor.predict_batch, batch of {args.batch}, {args.overhead}; {machine()}\n")
        print(table(["detector", "median ms / batch", "vs no detector"], rows))
        return rows, []

    import torch

    from models.predictor import Predictor

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = args.work
    per_class = 6 if args.quick else None
    digits10, digits8, held_out = write_digits(work, per_class)
    settings = run_settings(args.quick)
    runs = {"digits10": digits10, "digits8": digits8}
    if args.hymenoptera.is_dir():
        runs["hymenoptera"] = write_hymenoptera_csv(work, args.hymenoptera, args.quick)
    artifacts = {name: train_run(name, data, work, settings[name]) for name, data in runs.items()}

    limit = 6 if args.quick else None
    ood_sets = {"faces (LFW)": lfw_faces(limit)}
    if "hymenoptera" in runs:
        ood_sets["hymenoptera photos"] = folder_images(args.hymenoptera, 8 if args.quick else None)
        ood_sets["other photos (crops)"] = photo_crops(1 if args.quick else 8)
    protocols = []
    for name, (artifact, seconds) in artifacts.items():
        predictor = Predictor.from_artifact(artifact)
        labels = predictor.labels
        val_images, val_labels = split_images(artifact.parent, "val", labels)
        test_images, test_labels = split_images(artifact.parent, "test", labels)
        val, test = artifact_outputs(predictor, val_images), artifact_outputs(predictor, test_images)
        if name == "digits10":
            oods = {k: ood_sets[k] for k in ("hymenoptera photos", "faces (LFW)") if k in ood_sets}
        elif name == "digits8":
            oods = {"digits 8 and 9 (near)": folder_images(held_out, limit)}
            oods |= {k: ood_sets[k] for k in ("hymenoptera photos",) if k in ood_sets}
        else:
            digit_test, _ = split_images(artifacts["digits10"][0].parent, "test")
            oods = {"digits (test split)": digit_test, "faces (LFW)": ood_sets["faces (LFW)"],
                    "other photos (crops)": ood_sets["other photos (crops)"]}
        accuracy = float((test[0].argmax(1) == test_labels).mean())
        print(f"{name}: {len(labels)} classes, val {len(val_labels)}, test {len(test_labels)} "
              f"(test accuracy of the artifact {accuracy:.4f}){f', trained in {seconds:.0f} s' if seconds else ''}",
              flush=True)
        protocols.append({
            "name": name, "artifact": artifact, "test_images": test_images,
            "val": (*val, val_labels), "test": (*test, test_labels),
            "ood": {k: artifact_outputs(predictor, images) for k, images in oods.items()},
        })

    rows = measure(protocols, args.target_rejection)
    print(f"\nOOD detection, fitted on each run's validation split, threshold at {args.target_rejection:.0%} "
          f"ID rejection; {machine()}\n")
    print(table(["model (ID)", "OOD set", "method", "AUROC", "FPR@95TPR", "ID test flagged", "OOD flagged",
                 "ID/OOD images"], rows))
    cost = scoring_cost(protocols[0]["artifact"], protocols[0], args.batch, 0.5 if args.quick else 5.0)
    print(f"\nScoring cost for a batch of {args.batch} ({protocols[0]['name']} artifact), median ms\n")
    print(table(["step", "ms / batch", "share of forward"], cost))
    return rows, cost


if __name__ == "__main__":
    main()
