"""Prometheus metrics of the out-of-distribution score, so an operator sees drift on a dashboard.

Two metrics, without labels (nothing per path, client or image, so the series count is fixed):

- `transfer_serve_ood_flagged_total` (counter): images /classify answered with `unknown: true`;
- `transfer_serve_ood_score` (histogram): the OOD score of every image /classify scored. Its buckets are
  placed around the model's threshold (`score_buckets`), one edge exactly at it, so
  `1 - bucket{le="<threshold>"} / count` is the share flagged and a shift of the whole distribution shows in
  the neighbouring buckets.

Built with BentoML's `bentoml.metrics` (a lazy proxy to `prometheus_client`, deprecated in BentoML 1.4 in
favour of `prometheus_client` itself, with the same objects): it must be created in the worker process,
after BentoML has set `PROMETHEUS_MULTIPROC_DIR`, which is why the service creates it in `__init__`, not at
import.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

FLAGGED_METRIC = "transfer_serve_ood_flagged"  # exposed as transfer_serve_ood_flagged_total
SCORE_METRIC = "transfer_serve_ood_score"
_OFFSETS = (-1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def score_buckets(threshold: float) -> list[float]:
    """Histogram edges at threshold + s * offset, s = max(|threshold|, 0.01): from 0 (or 2x below) to 3x the
    threshold's scale above, with the threshold itself an edge (every method: higher score = more OOD)."""
    scale = max(abs(threshold), 0.01)
    edges = sorted({round(threshold + scale * offset, 6) for offset in _OFFSETS})
    edges[edges.index(round(threshold, 6))] = threshold  # exactly the threshold, not a rounded neighbour
    return edges + [math.inf]


class OODMetrics:
    """The two metrics for one served model; `record` them for one batch's scores and flags."""

    def __init__(self, threshold: float) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # bentoml.metrics' own deprecation notice
            from bentoml.metrics import Counter, Histogram

        self.flagged = Counter(FLAGGED_METRIC, "Images /classify answered as unknown (out-of-distribution).")
        self.score = Histogram(
            SCORE_METRIC, "Out-of-distribution score of images /classify scored (higher = more unlike the "
            "training images).", buckets=score_buckets(threshold),
        )

    def record(self, scores: np.ndarray, unknown: np.ndarray) -> None:
        for value in np.asarray(scores, dtype=np.float64):
            if np.isfinite(value):
                self.score.observe(float(value))
        flagged = int(np.count_nonzero(unknown))
        if flagged:
            self.flagged.inc(flagged)
