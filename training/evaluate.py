"""Held-out evaluation: accuracy, macro-F1, per-class precision/recall, confusion matrix, calibration."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

import numpy as np
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

if TYPE_CHECKING:
    from models.predictor import Predictor
    from training.data import ImageRecord, SkippedImage


class ClassMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class EvaluationReport(BaseModel):
    images: int
    accuracy: float
    macro_f1: float
    expected_calibration_error: float
    labels: list[str]
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    """Rows: true label, columns: predicted label, in `labels` order."""
    accuracy_ci95: tuple[float, float] | None = None
    """95% Wilson score interval of the accuracy: what `images` independent images allow one to say."""
    source: str = "test"
    """Which images: 'test' (held out, touched once), 'validation' (no test split; it chose the step count, so
    it is optimistic) or the data `evaluate` was given."""
    note: str | None = None

    def headline(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "expected_calibration_error": self.expected_calibration_error,
        }


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z); (0, 1) for no trials."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def evaluate_predictions(probabilities: np.ndarray, targets: Sequence[int], labels: Sequence[str]) -> EvaluationReport:
    targets = np.asarray(targets)
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=indices, zero_division=0
    )
    return EvaluationReport(
        images=len(targets),
        accuracy=float(accuracy_score(targets, predicted)),
        macro_f1=float(f1_score(targets, predicted, labels=indices, average="macro", zero_division=0)),
        expected_calibration_error=expected_calibration_error(probabilities, targets),
        labels=list(labels),
        per_class={
            label: ClassMetrics(precision=float(p), recall=float(r), f1=float(f), support=int(s))
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        confusion_matrix=confusion_matrix(targets, predicted, labels=indices).tolist(),
        accuracy_ci95=wilson_interval(int((predicted == targets).sum()), len(targets)),
    )


def save_confusion_matrix_png(report: EvaluationReport, path: Path | BinaryIO) -> Path | BinaryIO:
    """Draw the confusion matrix as a PNG into `path` (a file name, or a binary file open for writing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5.0, 0.5 * len(report.labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(report.confusion_matrix), display_labels=report.labels).plot(
        ax=axes, colorbar=False, xticks_rotation="vertical"
    )
    axes.set_title(f"accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f} (n={report.images})")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
    return path


def evaluate_artifact(
    predictor: "Predictor", records: Sequence["ImageRecord"], batch_size: int = 32
) -> tuple[EvaluationReport, list["SkippedImage"]]:
    """Run an exported model over labelled records exactly as the service would, and score it."""
    from models.decoding import ImageDecodeError, load_image
    from training.data import DataError, SkippedImage

    unknown = sorted({r.label for r in records} - set(predictor.labels))
    if unknown:
        raise DataError(f"labels not known to the model: {unknown}; the model knows {predictor.labels}")
    index = {label: i for i, label in enumerate(predictor.labels)}
    probabilities, targets, skipped = [], [], []
    for start in range(0, len(records), batch_size):
        images = []
        for record in records[start : start + batch_size]:
            try:
                images.append(load_image(record.path, preprocessing=predictor.manifest.preprocessing))
                targets.append(index[record.label])
            except ImageDecodeError as exc:
                skipped.append(SkippedImage(path=record.path, reason=str(exc)))
        if images:
            probabilities.append(predictor.predict(images).probabilities)
    if not probabilities:
        raise DataError("none of the images could be read")
    return evaluate_predictions(np.concatenate(probabilities), targets, predictor.labels), skipped
