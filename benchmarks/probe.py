"""The frozen-feature reference of the quality benchmark: a logistic-regression probe on frozen embeddings.

The embeddings are computed through the product's own decoding (`models.decoding.load_image`), preprocessing
(`models.preprocessing.preprocess_batch`) and backbone (`models.registry.create_backbone`), so a probe figure
measures the same pixels the product trains and serves on. Each image is embedded once per (backbone,
preprocessing) and kept in a `.npz` file under the cache folder, so the samplings of every protocol reuse them.

The probe is the one the datasets README describes: embeddings L2-normalised, logistic regression with C chosen
from 0.1-10 by stratified 5-fold cross-validation on the training images (fewer folds when a class has fewer
than 5 images).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

PROBE_CS = np.logspace(-1, 1, 5)


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised embeddings of images, by path, and what they cost to compute."""

    by_path: dict[str, np.ndarray]
    cpu_seconds_per_image: float
    wall_seconds_per_image: float
    threads: int
    skipped: int

    def of(self, paths: Sequence[str]) -> np.ndarray:
        return np.stack([self.by_path[p] for p in paths])


def _cache_file(cache: Path, backbone: str, preprocessing_json: str, paths: Sequence[str]) -> Path:
    key = hashlib.sha256("\n".join([backbone, preprocessing_json, *sorted(paths)]).encode()).hexdigest()[:16]
    return cache / f"embeddings-{backbone.replace('/', '_').replace(':', '_')}-{key}.npz"


def embed_paths(paths: Sequence[str], backbone: str, preprocessing, cache: Path, weights: str = "imagenet",
                batch_size: int = 32) -> Embeddings:
    """Embeddings of every decodable image in `paths` (undecodable ones are left out and counted)."""
    import torch

    from models.decoding import ImageDecodeError, load_image
    from models.preprocessing import preprocess_batch
    from models.registry import create_backbone

    cache.mkdir(parents=True, exist_ok=True)
    cached = _cache_file(cache, backbone, preprocessing.model_dump_json(), paths)
    if cached.is_file():
        stored = np.load(cached, allow_pickle=False)
        return Embeddings(dict(zip(stored["paths"].tolist(), stored["embeddings"])),
                          float(stored["cpu"]), float(stored["wall"]), int(stored["threads"]), int(stored["skipped"]))
    previous_threads = torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1):  # a busy shared CPU embeds faster on 1 thread (docs/TRAINING.md)
        torch.set_num_threads(1)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = create_backbone(backbone, weights).eval()
    kept: list[str] = []
    vectors: list[np.ndarray] = []
    wall = cpu = 0.0
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images, names = [], []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(load_image(path, preprocessing=preprocessing))
                    names.append(path)
                except ImageDecodeError:
                    continue
            if not images:
                continue
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            batch = torch.from_numpy(preprocess_batch(images, preprocessing))
            vectors.append(model(batch).numpy())
            wall += time.perf_counter() - wall_start
            cpu += time.process_time() - cpu_start
            kept += names
    torch.set_num_threads(previous_threads)
    matrix = np.concatenate(vectors).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    result = Embeddings(dict(zip(kept, matrix)), cpu / len(kept), wall / len(kept), threads, len(paths) - len(kept))
    np.savez(cached, paths=np.array(kept), embeddings=matrix, cpu=result.cpu_seconds_per_image,
             wall=result.wall_seconds_per_image, threads=threads, skipped=result.skipped)
    return result


def fit_probe(train: np.ndarray, targets: np.ndarray):
    """Logistic regression on L2-normalised embeddings, C from 0.1-10 by stratified k-fold (k <= 5)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    folds = int(min(5, np.bincount(targets).min()))
    probe = LogisticRegressionCV(Cs=PROBE_CS, cv=StratifiedKFold(folds, shuffle=True, random_state=0), max_iter=5000,
                                 scoring="accuracy")
    with warnings.catch_warnings():  # scikit-learn 1.8's notices of future default changes; the settings are explicit
        warnings.simplefilter("ignore", FutureWarning)
        return probe.fit(train, targets)


def probe_accuracy(embeddings: Embeddings, train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]],
                   labels: Sequence[str]) -> tuple[float, float, dict]:
    """(test accuracy, chosen C, the evaluation report) of a probe fitted on `train` (path, label) pairs."""
    from training.evaluate import evaluate_predictions

    train = [(p, label) for p, label in train if p in embeddings.by_path]
    test = [(p, label) for p, label in test if p in embeddings.by_path]
    index = {label: i for i, label in enumerate(labels)}
    probe = fit_probe(embeddings.of([p for p, _ in train]), np.array([index[label] for _, label in train]))
    probabilities = probe.predict_proba(embeddings.of([p for p, _ in test]))
    report = evaluate_predictions(probabilities, [index[label] for _, label in test], list(labels))
    return report.accuracy, float(probe.C_[0]), report
