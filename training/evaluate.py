"""Held-out evaluation: accuracy, macro-F1, per-class precision/recall, confusion matrix, calibration, and
(for an artifact with an out-of-distribution detector) the share flagged unknown and, against a folder of
foreign images, AUROC / FPR@95%TPR with a histogram of the two score distributions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

import numpy as np
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from models.ood import OODEvaluation, evaluate_ood

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
    ood_flagged_share: float | None = None
    """Share of these (in-distribution) images the artifact's OOD detector flags unknown (≈ its target rate);
    None when not measured (no detector, or a training run's report)."""
    ood: OODEvaluation | None = None
    """These images (ID) against a folder of out-of-distribution images (`evaluate --ood DIR`)."""
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


def predict_files(
    predictor: "Predictor", paths: Sequence[Path], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray | None, list[int], list["SkippedImage"]]:
    """Run an exported model over image files exactly as the service would: (probabilities, OOD scores or None,
    indices of the paths that were read, unreadable images)."""
    from models.decoding import ImageDecodeError, load_image
    from training.data import SkippedImage

    probabilities, scores, kept, skipped = [], [], [], []
    for start in range(0, len(paths), batch_size):
        images = []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(load_image(paths[i], preprocessing=predictor.manifest.preprocessing))
                kept.append(i)
            except ImageDecodeError as exc:
                skipped.append(SkippedImage(path=paths[i], reason=str(exc)))
        if images:
            outputs = predictor.predict(images)
            probabilities.append(outputs.probabilities)
            scores.append(outputs.ood_scores)
    if not probabilities:
        return np.zeros((0, len(predictor.labels)), np.float32), None, kept, skipped
    ood_scores = None if predictor.ood is None else np.concatenate(scores)
    return np.concatenate(probabilities), ood_scores, kept, skipped


def evaluate_artifact(
    predictor: "Predictor",
    records: Sequence["ImageRecord"],
    batch_size: int = 32,
    ood_images: Sequence[Path] | None = None,
    ood_histogram_png: Path | None = None,
    html_report: Path | None = None,
) -> tuple[EvaluationReport, list["SkippedImage"]]:
    """Run an exported model over labelled records exactly as the service would, and score it. With an OOD
    detector, the report gives the share of these images flagged unknown; `ood_images` (foreign images) adds
    AUROC, FPR@95%TPR and the shares flagged at the artifact's threshold, and `ood_histogram_png` the plot of
    both score distributions; `html_report` the page a person reads (`training.html_report`: worst mistakes as
    thumbnails, reliability diagram, most and least unusual images)."""
    from training.data import DataError

    unknown = sorted({r.label for r in records} - set(predictor.labels))
    if unknown:
        raise DataError(f"labels not known to the model: {unknown}; the model knows {predictor.labels}")
    if ood_images is not None and predictor.ood is None:
        raise DataError("the artifact has no out-of-distribution detector (exported without one), so --ood cannot "
                        "be evaluated; retrain with --ood-method knn")
    index = {label: i for i, label in enumerate(predictor.labels)}
    probabilities, id_scores, kept, skipped = predict_files(predictor, [r.path for r in records], batch_size)
    if not kept:
        raise DataError("none of the images could be read")
    targets = [index[records[i].label] for i in kept]
    report = evaluate_predictions(probabilities, targets, predictor.labels)
    if id_scores is not None:
        report.ood_flagged_share = float((id_scores > predictor.ood.threshold).mean())
    if ood_images is not None:
        _, ood_scores, ood_kept, ood_skipped = predict_files(predictor, list(ood_images), batch_size)
        skipped += ood_skipped
        if not ood_kept:
            raise DataError("none of the out-of-distribution images could be read")
        report.ood = evaluate_ood(id_scores, ood_scores, predictor.ood.threshold)
        if ood_histogram_png is not None:
            save_ood_histogram_png(id_scores, ood_scores, predictor.ood.threshold, ood_histogram_png)
    if html_report is not None:
        from training.html_report import write_evaluation_html

        write_evaluation_html(report, [records[i].path for i in kept], probabilities, np.asarray(targets), html_report,
                              ood_scores=id_scores, title=f"Evaluation of {predictor.manifest.name} {predictor.manifest.version}")
    return report, skipped


def save_ood_histogram_png(
    id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float, path: Path | BinaryIO
) -> Path | BinaryIO:
    """Both OOD score distributions (ID and OOD images) on shared bins, with the threshold marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    id_scores = np.asarray(id_scores, dtype=np.float64)
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    both = np.concatenate([id_scores, ood_scores, [threshold]])
    both = both[np.isfinite(both)]
    bins = np.linspace(both.min(), both.max(), 41) if both.max() > both.min() else 10
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(id_scores[np.isfinite(id_scores)], bins=bins, alpha=0.6, density=True,
              label=f"in-distribution (n={len(id_scores)})")
    axes.hist(ood_scores[np.isfinite(ood_scores)], bins=bins, alpha=0.6, density=True,
              label=f"out-of-distribution (n={len(ood_scores)})")
    axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set_xlabel("OOD score (higher = more out-of-distribution)")
    axes.set_ylabel("density")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
    return path
