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
    """L2-normalised embeddings of images, by path, and what computing them cost (CPU and wall seconds summed
    over the `images` embedded, on `threads` intra-op threads)."""

    by_path: dict[str, np.ndarray]
    cpu_seconds: float
    wall_seconds: float
    images: int
    threads: int
    undecodable: tuple[str, ...]

    def of(self, paths: Sequence[str]) -> np.ndarray:
        return np.stack([self.by_path[p] for p in paths])

    @property
    def cpu_seconds_per_image(self) -> float:
        return self.cpu_seconds / max(1, self.images)

    @property
    def wall_seconds_per_image(self) -> float:
        return self.wall_seconds / max(1, self.images)

    def save(self, path: Path) -> None:
        np.savez(path, paths=np.array(list(self.by_path)), embeddings=self.of(list(self.by_path)),
                 cost=np.array([self.cpu_seconds, self.wall_seconds, self.images, self.threads]),
                 undecodable=np.array(self.undecodable, dtype=str))

    @classmethod
    def load(cls, path: Path) -> "Embeddings":
        stored = np.load(path, allow_pickle=False)
        cpu, wall, images, threads = stored["cost"].tolist()
        return cls(dict(zip(stored["paths"].tolist(), stored["embeddings"])), cpu, wall, int(images), int(threads),
                   tuple(stored["undecodable"].tolist()))


def _cache_file(cache: Path, backbone: str, preprocessing_json: str) -> Path:
    key = hashlib.sha256(f"{backbone}\n{preprocessing_json}".encode()).hexdigest()[:16]
    return cache / f"embeddings-{backbone.replace('/', '_').replace(':', '_')}-{key}.npz"


def embed_paths(paths: Sequence[str], backbone: str, preprocessing, cache: Path, weights: str = "imagenet",
                batch_size: int = 32) -> Embeddings:
    """Embeddings of every decodable image in `paths`; images already in the cache of this (backbone,
    preprocessing) are not embedded again, so samplings and protocols on the same photos share the cost."""
    import torch

    from models.decoding import ImageDecodeError, load_image
    from models.preprocessing import preprocess_batch
    from models.registry import create_backbone

    cache.mkdir(parents=True, exist_ok=True)
    cached_file = _cache_file(cache, backbone, preprocessing.model_dump_json())
    known = Embeddings.load(cached_file) if cached_file.is_file() else Embeddings({}, 0.0, 0.0, 0, 1, ())
    missing = [p for p in paths if p not in known.by_path and p not in known.undecodable]
    if not missing:
        return known
    previous_threads = torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1):  # a busy shared CPU embeds faster on 1 thread (docs/TRAINING.md)
        torch.set_num_threads(1)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = create_backbone(backbone, weights).eval()
    by_path = dict(known.by_path)
    undecodable = list(known.undecodable)
    wall = cpu = 0.0
    embedded = 0
    with torch.no_grad():
        for start in range(0, len(missing), batch_size):
            images, names = [], []
            for path in missing[start : start + batch_size]:
                try:
                    images.append(load_image(path, preprocessing=preprocessing))
                    names.append(path)
                except ImageDecodeError:
                    undecodable.append(path)
            if not images:
                continue
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            vectors = model(torch.from_numpy(preprocess_batch(images, preprocessing))).numpy().astype(np.float32)
            wall += time.perf_counter() - wall_start
            cpu += time.process_time() - cpu_start
            embedded += len(names)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            by_path.update(zip(names, vectors))
    torch.set_num_threads(previous_threads)
    result = Embeddings(by_path, known.cpu_seconds + cpu, known.wall_seconds + wall, known.images + embedded,
                        threads, tuple(undecodable))
    result.save(cached_file)
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
