"""The shape of `audit.json`: every finding with its paths and scores. `AUDIT_SCHEMA_VERSION` changes when a
field changes meaning or goes away (adding a field does not)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from training.data import SplitName

AUDIT_SCHEMA_VERSION = 1


class AuditedImage(BaseModel):
    """One labelled image as the audit saw it."""

    path: Path
    label: str
    split: SplitName | None = None


class UnreadableFile(BaseModel):
    path: Path
    label: str
    reason: str = Field(description="Why the one decoding function refused it: `train` skips it.")


class DuplicateGroup(BaseModel):
    """Images that are the same photo: byte-identical (`exact`) or with embeddings closer than the threshold."""

    kind: str = Field(description="'exact' (same sha256) or 'near' (cosine similarity >= the threshold).")
    images: list[AuditedImage]
    similarity: float = Field(description="Smallest pairwise cosine similarity linking the group (1.0 for exact).")
    across_splits: bool = Field(description="The group spans two splits: the held-out estimate is inflated.")
    across_labels: bool = Field(description="The group carries two labels: at least one of them is wrong.")


class LabelSuspect(BaseModel):
    """An image whose label the out-of-fold probe doubts, most doubtful first."""

    image: AuditedImage
    given_probability: float = Field(description="Out-of-fold probability of the given label (self-confidence).")
    suggested_label: str
    suggested_probability: float
    margin: float = Field(description="p(given) - max p(other label) (normalized margin; negative: probe disagrees).")
    flagged: bool = Field(description="Confident learning counts it off-diagonal: p(suggested) >= that class's "
                          "mean self-confidence and the suggestion is not the given label.")


class ClassSummary(BaseModel):
    label: str
    images: int
    per_split: dict[str, int]
    outliers: int = Field(description="Images of this class flagged as outliers.")


class Outlier(BaseModel):
    image: AuditedImage
    score: float = Field(description="Distance (L2, unit embeddings) to the k-th nearest image of the same label.")
    robust_z: float = Field(description="(score - class median) / (1.4826 x class MAD): flagged above the limit.")
    ood_score: float | None = Field(None, description="The artifact's OOD score, when it has a detector.")


class AuditSettings(BaseModel):
    model_config = {"protected_namespaces": ()}

    data: str
    model: str = Field(description="The artifact audited with, or the default backbone and its image size.")
    images: int
    near_duplicate_threshold: float
    folds: int
    outlier_z: float
    capped_at: int = Field(description="Most findings of each list written (the counts cover all).")


class AuditReport(BaseModel):
    schema_version: int = AUDIT_SCHEMA_VERSION
    settings: AuditSettings
    summary: str
    unreadable: list[UnreadableFile]
    ignored_files: list[Path] = Field(description="Files in the class folders with no image suffix: not read.")
    duplicate_groups: list[DuplicateGroup]
    label_suspects: list[LabelSuspect]
    label_issues_flagged: int
    classes: list[ClassSummary]
    outliers: list[Outlier]
    note: str | None = None
