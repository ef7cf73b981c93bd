"""Class balance and outliers: per class, each image's distance to its k-th nearest image of the same label
(the kNN out-of-distribution score of models/ood.py, Sun et al. 2022, fitted on the class itself, leave one
out), flagged when its robust z-score (median / MAD within the class) is above a limit."""

from __future__ import annotations

import numpy as np

DEFAULT_K = 10
DEFAULT_OUTLIER_Z = 3.5
BLOCK_ROWS = 1024


def kth_neighbour_distance(unit: np.ndarray, k: int, block: int = BLOCK_ROWS) -> np.ndarray:
    """Leave-one-out distance from each unit row to its k-th nearest other row, blockwise (O(block x n) memory)."""
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    out = np.empty(len(unit))
    for start in range(0, len(unit), block):
        similarity = unit[start : start + block] @ unit.T
        similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -np.inf
        kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        out[start : start + len(similarity)] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def class_outlier_scores(unit: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, robust z) per image, within its own class; a class of fewer than 3 images scores 0."""
    scores = np.zeros(len(targets))
    robust_z = np.zeros(len(targets))
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        if len(members) < 3:
            continue
        s = kth_neighbour_distance(unit[members], min(DEFAULT_K, len(members) - 1))
        median = np.median(s)
        spread = 1.4826 * np.median(np.abs(s - median))
        scores[members] = s
        robust_z[members] = (s - median) / spread if spread > 0 else 0.0
    return scores, robust_z
