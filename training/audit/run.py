"""`run_audit`: scan, split as `train` would, embed, then duplicates, label suspects, class balance and
outliers; written as `audit.json` (`AuditReport`) and `audit.html`, summed up in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.artifact import load_artifact
from models.files import atomic_write_text
from models.registry import DEFAULT_BACKBONE
from training.audit.duplicates import DEFAULT_NEAR_DUPLICATE_THRESHOLD, exact_groups, near_groups, rank_groups
from training.audit.embedder import embedder_artifact
from training.audit.label_issues import score_labels
from training.audit.outliers import DEFAULT_OUTLIER_Z, class_outlier_scores
from training.audit.scan import ignored_files, scan_files
from training.audit.schema import (
    AuditedImage,
    AuditReport,
    AuditSettings,
    ClassSummary,
    LabelSuspect,
    Outlier,
    UnreadableFile,
)
from training.data import DataError, ImageRecord, discover_images, split_records

EngineName = Literal["local", "ray"]
"""Extraction's engines (`extraction.config.EngineName`; training does not import the extraction job)."""


class EmbeddingsLike(Protocol):
    unit: np.ndarray  # (N, D) float32, L2-normalised, in the order of the paths asked for
    ood_scores: np.ndarray | None  # (N,) the artifact's OOD score, when it has a detector


EmbedPaths = Callable[[Sequence[Path], Path, Path, EngineName, bool], EmbeddingsLike]
"""(paths, artifact, work folder, engine, show progress) -> embeddings: `extraction.embed.embed_paths`, passed in
by the caller (the CLI) because the training layer does not import the extraction job."""

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"


class AuditConfig(BaseModel):
    """Every option of `transfer-serve audit`, validated in one place."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="Image folder (one sub-folder per class, or train/val/test folders) or CSV manifest.")
    output: Path = Field(description="Folder for audit.json, audit.html and the embeddings.")
    artifact: Path | None = Field(None, description="A trained artifact whose network embeds (default: the "
                                  "default backbone's ImageNet weights).")
    backbone: str = Field(DEFAULT_BACKBONE, description="Backbone when no artifact is given.")
    image_size: int | None = Field(None, gt=0, description="Input side without an artifact (default: the backbone's).")
    embedder: Path | None = Field(None, description="Folder of the exported default-backbone embedder (default: "
                                  "OUTPUT/embedder; reused by later audits).")
    near_duplicate_threshold: float = Field(DEFAULT_NEAR_DUPLICATE_THRESHOLD, gt=0, le=1)
    outlier_z: float = Field(DEFAULT_OUTLIER_Z, gt=0)
    max_findings: int = Field(100, ge=1, description="Most suspects and outliers listed (counts cover all).")
    engine: EngineName = "local"
    seed: int = 0
    show_progress: bool = True


def _with_splits(records: list[ImageRecord], seed: int) -> tuple[list[ImageRecord], str | None]:
    """The records with the split `train` would use: the data's own, or the stratified split `train` makes."""
    if any(r.split for r in records):
        return records, None
    try:
        return split_records(records, seed=seed).records(), None
    except DataError as exc:
        return records, f"no split could be made as `train` would ({exc}); duplicates are not checked across splits"


def _summary(report: AuditReport) -> str:
    groups = report.duplicate_groups
    parts = [
        f"{len(report.unreadable)} unreadable files",
        f"{sum(g.across_splits for g in groups)} duplicate groups across splits",
        f"{sum(g.across_labels for g in groups)} across labels",
        f"{len(groups)} duplicate groups in all",
        f"{report.label_issues_flagged} likely label errors",
        f"{sum(c.outliers for c in report.classes)} outliers",
    ]
    return ", ".join(parts) + f" ({report.settings.images} images)"


def run_audit(config: AuditConfig, embed: EmbedPaths) -> AuditReport:
    """Audit `config.data`, embedding with `embed`; writes OUTPUT/audit.json and OUTPUT/audit.html and returns the report."""
    from training.html_report import write_audit_html

    config.output.mkdir(parents=True, exist_ok=True)
    if config.artifact is not None:
        artifact = config.artifact
        manifest = load_artifact(artifact).manifest
        model = f"artifact {artifact} ({manifest.name} {manifest.version})"
    else:
        artifact = embedder_artifact(config.embedder or config.output / "embedder", config.backbone, config.image_size)
        manifest = load_artifact(artifact).manifest
        model = f"{config.backbone} ImageNet weights at {manifest.preprocessing.image_size} px"
    records = discover_images(config.data)
    scanned = scan_files(records, manifest.preprocessing)
    unreadable = [UnreadableFile(path=s.record.path, label=s.record.label, reason=s.reason) for s in scanned if s.reason]
    good = [s for s in scanned if s.reason is None]
    if len(good) < 2:
        raise DataError(f"{config.data}: fewer than 2 readable images ({len(unreadable)} unreadable)")
    split_records_, note = _with_splits([s.record for s in good], config.seed)
    by_path = {r.path: r.split for r in split_records_}
    images = [AuditedImage(path=s.record.path, label=s.record.label, split=by_path.get(s.record.path, s.record.split))
              for s in good]
    hashes = [s.sha256 for s in good]

    embeddings = embed([i.path for i in images], artifact, config.output / "embeddings", config.engine,
                             config.show_progress)
    groups = rank_groups(exact_groups(images, hashes)
                         + near_groups(images, embeddings.unit, config.near_duplicate_threshold, hashes))

    labels = sorted({i.label for i in images})
    targets = np.array([labels.index(i.label) for i in images])
    scores = score_labels(embeddings.unit, targets, len(labels), config.seed)
    suspects: list[LabelSuspect] = []
    flagged = 0
    if scores is None:
        note = (note + "; " if note else "") + "a class has fewer than 2 readable images: no label check"
    else:
        flagged = int(scores.flagged.sum())
        for i in scores.order[: config.max_findings]:
            p = scores.probabilities[i]
            best = int(np.argmax(np.where(np.arange(len(labels)) == targets[i], -np.inf, p)))
            suspects.append(LabelSuspect(
                image=images[i], given_probability=round(float(scores.self_confidence[i]), 6),
                suggested_label=labels[best], suggested_probability=round(float(p[best]), 6),
                margin=round(float(scores.margin[i]), 6), flagged=bool(scores.flagged[i]),
            ))

    outlier_scores, robust_z = class_outlier_scores(embeddings.unit, targets)
    is_outlier = robust_z > config.outlier_z
    order = np.argsort(-robust_z, kind="stable")
    outliers = [
        Outlier(image=images[i], score=round(float(outlier_scores[i]), 6), robust_z=round(float(robust_z[i]), 3),
                ood_score=None if embeddings.ood_scores is None else float(embeddings.ood_scores[i]))
        for i in order[: config.max_findings] if is_outlier[i]
    ]
    classes = [
        ClassSummary(
            label=label, images=int((targets == c).sum()),
            per_split={split or "unsplit": sum(1 for i in images if i.label == label and i.split == split)
                       for split in sorted({i.split for i in images}, key=str)},
            outliers=int(is_outlier[targets == c].sum()),
        )
        for c, label in enumerate(labels)
    ]
    report = AuditReport(
        settings=AuditSettings(
            data=str(config.data), model=model, images=len(records),
            near_duplicate_threshold=config.near_duplicate_threshold,
            folds=scores.folds if scores else 0, outlier_z=config.outlier_z, capped_at=config.max_findings,
        ),
        summary="", unreadable=unreadable, ignored_files=ignored_files(config.data), duplicate_groups=groups,
        label_suspects=suspects, label_issues_flagged=flagged, classes=classes, outliers=outliers, note=note,
    )
    report.summary = _summary(report)
    atomic_write_text(config.output / AUDIT_JSON, report.model_dump_json(indent=2))
    write_audit_html(report, config.output / AUDIT_HTML)
    return report
