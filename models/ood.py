"""Out-of-distribution ("none of these") scoring on the outputs of the classifier's own forward pass.

A classifier always answers one of its classes, even for a photo of something it never saw. An
`OODDetector` turns the two outputs every runtime already returns, the logits `(N, C)` and the penultimate
embedding `(N, D)`, into one score per image and flags the image as out-of-distribution (OOD) when the
score is above a threshold. The convention for every method: **higher score = more out-of-distribution**.

Methods (`OODMethod`):
- ``msp``:  1 - maximum softmax probability (Hendrycks & Gimpel, 2017).
- ``energy``: -logsumexp(logits), the free energy at T = 1 (Liu et al., 2020).
- ``mahalanobis``: smallest squared Mahalanobis distance of the embedding to a class mean, with one
  shared covariance estimated with Ledoit-Wolf shrinkage (Lee et al., 2018; the embedding is L2-normalised
  first when ``normalize=True``).
- ``knn`` (the default, chosen by measurement: docs/OOD.md): Euclidean distance from the L2-normalised embedding to its k-th nearest neighbour in a
  reference set of normalised in-distribution embeddings (Sun et al., 2022).

`OODDetector.fit` fits on held-out in-distribution outputs (the run's validation split) and sets the
threshold at the ``target_rejection`` quantile of in-distribution scores (5% flagged by default). Scores
used for that quantile are out-of-sample: kNN scores each fitting point leave-one-out (a point is never
its own neighbour) and Mahalanobis scores each point with class means and covariance fitted on the other
folds (cross-fitting); MSP and energy fit no parameters. The fitted parameters are saved as one `ood.npz`
(plain arrays, read back with numpy's default ``allow_pickle=False``) and described by an `OODSummary` for the manifest.
Scoring is numpy only: a few matrix products per batch, no second model call.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.files import atomic_write

OODMethod = Literal["msp", "energy", "mahalanobis", "knn"]
METHODS: tuple[OODMethod, ...] = get_args(OODMethod)
DEFAULT_METHOD: OODMethod = "knn"
DEFAULT_TARGET_REJECTION = 0.05
DEFAULT_K = 10
DEFAULT_MAX_REFERENCE = 2048
OOD_FILE = "ood.npz"
_MIN_FOLDS = 2
_FOLDS = 5
MAX_OOD_BYTES = 512 * 1024 * 1024
"""Most that loading `ood.npz` may allocate: its arrays' sizes are checked against this, and against the shapes the
manifest's summary implies, from the zip directory and each array's header before any array is read (a 2 MB file
may declare gigabytes of zeros)."""
_NPY_HEADER_BYTES = 64 * 1024

# Arrays each method keeps in ood.npz (besides "method", a 0-d string checked against the summary).
_ARRAYS: dict[str, tuple[str, ...]] = {
    "msp": (),
    "energy": (),
    "mahalanobis": ("means", "precision", "mean_norms"),
    "knn": ("reference",),
}


class OODError(ValueError):
    """Inputs or stored parameters an OOD detector cannot use; the message says what is wrong."""


class OODSummary(BaseModel):
    """What the manifest records about the fitted detector (the arrays live in `file`)."""

    model_config = ConfigDict(extra="forbid")

    method: OODMethod
    threshold: float = Field(
        allow_inf_nan=False, description="Flag an image as out-of-distribution when its score is above this."
    )
    target_rejection_rate: float = Field(description="Share of in-distribution images meant to be flagged.")
    measured_rejection_rate: float = Field(
        description="Share of the fitting images flagged at the threshold, scored out-of-sample (see calibration)."
    )
    calibration: Literal["in-sample", "leave-one-out", "cross-fitted"] = Field(
        description="How the fitting images were scored for the threshold: msp/energy fit nothing (in-sample is "
        "unbiased); knn leaves each point out of its own neighbours; mahalanobis uses out-of-fold means/covariance."
    )
    fitted_images: int = Field(description="In-distribution images the detector and its threshold were fitted on.")
    num_classes: int
    embedding_dim: int
    normalize: bool = Field(description="Whether embeddings are L2-normalised before mahalanobis/knn.")
    k: int | None = Field(default=None, ge=1, description="knn: the neighbour whose distance is the score.")
    n_reference: int | None = Field(default=None, ge=1, description="knn: reference embeddings kept.")
    shrinkage: float | None = Field(default=None, description="mahalanobis: Ledoit-Wolf shrinkage of the covariance.")
    file: str | None = Field(default=None, description="Artifact file with the arrays, or None when none are needed.")


class OODEvaluation(BaseModel):
    """In-distribution vs OOD separation; positives are the OOD images."""

    auroc: float
    fpr_at_95_tpr: float = Field(description="Share of ID images flagged when the threshold flags 95% of the OOD ones.")
    flagged_share_id: float = Field(description="Share of ID images above the given threshold.")
    flagged_share_ood: float = Field(description="Share of OOD images above the given threshold.")
    id_images: int
    ood_images: int


# ----------------------------------------------------------------------------------------- scoring
def _check_outputs(logits: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    embeddings = np.asarray(embeddings)
    if logits.ndim != 2 or embeddings.ndim != 2:
        raise OODError(f"expected logits (N, C) and embeddings (N, D), got shapes {logits.shape} and {embeddings.shape}")
    if len(logits) != len(embeddings):
        raise OODError(f"logits and embeddings disagree on the number of images: {len(logits)} vs {len(embeddings)}")
    for name, array in (("logits", logits), ("embeddings", embeddings)):
        if not np.issubdtype(array.dtype, np.number):
            raise OODError(f"{name} must be numeric, got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise OODError(f"{name} contain NaN or infinite values")
    return logits.astype(np.float64), embeddings.astype(np.float64)


def _l2_normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def msp_score(logits: np.ndarray) -> np.ndarray:
    """1 - max softmax probability: 0 for a certain answer, up to 1 - 1/C for a uniform one."""
    # = rest / (1 + rest) with rest = sum of exp(logit - max logit) over the other classes: exact even where
    # 1 - max probability would round to 0 (confident answers), so confident images keep distinct scores.
    others = np.exp(logits - logits.max(axis=1, keepdims=True))
    others[np.arange(len(logits)), logits.argmax(axis=1)] = 0.0
    rest = others.sum(axis=1)
    return rest / (1.0 + rest)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits): low (very negative) when some class has a large logit."""
    top = logits.max(axis=1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


def _mahalanobis_min(z: np.ndarray, means: np.ndarray, precision: np.ndarray, mean_norms: np.ndarray) -> np.ndarray:
    """min over classes of (z - mu_c)^T P (z - mu_c); `mean_norms[c]` = mu_c^T P mu_c."""
    zp = z @ precision
    squared = np.einsum("nd,nd->n", zp, z)[:, None] - 2.0 * zp @ means.T + mean_norms[None, :]
    return np.maximum(squared.min(axis=1), 0.0)


def _kth_distance(queries: np.ndarray, reference: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Distance from each unit-norm query to its k-th nearest unit-norm reference (1-based k).

    `exclude[i]` = index into `reference` that query i must not count as a neighbour (itself), or -1."""
    # float32 product: the reference is stored as float32, and at thousands of 1280-d rows a float64 copy would
    # not stay in cache (measured 10x slower); the error (~1e-7 in cosine) is far below any threshold's scale.
    similarity = (queries.astype(np.float32) @ reference.astype(np.float32, copy=False).T).astype(np.float64)
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        similarity[rows, exclude[rows]] = -np.inf
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))


def _fit_mahalanobis(z: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[dict[str, np.ndarray], float]:
    from sklearn.covariance import LedoitWolf

    means = np.stack([z[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = z - means[labels]
    estimator = LedoitWolf(assume_centered=True).fit(centred)
    precision = np.linalg.inv(estimator.covariance_)
    precision = (precision + precision.T) / 2.0
    # Kept as float32 (what ood.npz stores), so a loaded detector scores exactly like the fitted one.
    means32, precision32 = means.astype(np.float32), precision.astype(np.float32)
    mean_norms = np.einsum("cd,de,ce->c", means32.astype(np.float64), precision32.astype(np.float64), means32.astype(np.float64))
    arrays = {"means": means32, "precision": precision32, "mean_norms": mean_norms.astype(np.float64)}
    return arrays, float(estimator.shrinkage_)


def _mahalanobis_from(arrays: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    return _mahalanobis_min(z, arrays["means"].astype(np.float64), arrays["precision"].astype(np.float64),
                            arrays["mean_norms"].astype(np.float64))


# ---------------------------------------------------------------------------------------- detector
@dataclass(frozen=True)
class OODDetector:
    """A fitted OOD score and threshold. Build with `fit` or `load`; `score`/`flag` take one forward pass's outputs."""

    summary: OODSummary
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    _float64: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Mahalanobis scores in float64: convert its stored float32 arrays once, not on every batch (knn stays float32).
        wanted = self.arrays if self.summary.method == "mahalanobis" else {}
        object.__setattr__(self, "_float64", {name: np.asarray(a, dtype=np.float64) for name, a in wanted.items()})

    @property
    def method(self) -> OODMethod:
        return self.summary.method

    @property
    def threshold(self) -> float:
        return self.summary.threshold

    @classmethod
    def fit(
        cls,
        method: OODMethod,
        logits: np.ndarray,
        embeddings: np.ndarray,
        labels: np.ndarray,
        target_rejection: float = DEFAULT_TARGET_REJECTION,
        *,
        k: int | None = None,
        normalize: bool = True,
        max_reference: int = DEFAULT_MAX_REFERENCE,
        seed: int = 0,
    ) -> "OODDetector":
        """Fit `method` on in-distribution outputs (ideally held out from training: the validation split).

        `labels` are the true class indices (used by mahalanobis for the class means; checked for all).
        knn: `k` defaults to min(DEFAULT_K, images - 1); at most `max_reference` embeddings are kept (seeded sample).
        The threshold is the (1 - target_rejection) quantile of out-of-sample in-distribution scores.
        """
        if method not in METHODS:
            raise OODError(f"unknown OOD method {method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= target_rejection < 1.0:
            raise OODError(f"target_rejection must be in [0, 1), got {target_rejection}")
        logits, embeddings = _check_outputs(logits, embeddings)
        n, num_classes = logits.shape
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise OODError(f"labels must be {n} integer class indices, got shape {labels.shape} dtype {labels.dtype}")
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            raise OODError(f"labels must lie in [0, {num_classes}), got values from {labels.min()} to {labels.max()}")
        if n < 2:
            raise OODError(f"need at least 2 in-distribution images to fit an OOD threshold, got {n}")
        z = _l2_normalize(embeddings) if normalize else embeddings
        common = dict(method=method, target_rejection_rate=target_rejection, fitted_images=n,
                      num_classes=num_classes, embedding_dim=embeddings.shape[1], normalize=normalize)

        arrays: dict[str, np.ndarray] = {}
        extra: dict[str, object] = {}
        if method == "msp":
            calibration, scores = "in-sample", msp_score(logits)
        elif method == "energy":
            calibration, scores = "in-sample", energy_score(logits)
        elif method == "knn":
            k = min(DEFAULT_K, n - 1) if k is None else k
            if not normalize:
                raise OODError("knn works on L2-normalised embeddings (Sun et al., 2022); pass normalize=True")
            if not 1 <= k < n:
                raise OODError(f"knn needs 1 <= k < number of fitting images ({n}), got k={k}")
            if max_reference <= k:
                raise OODError(f"max_reference ({max_reference}) must exceed k ({k})")
            keep = np.arange(n)
            if n > max_reference:
                keep = np.sort(np.random.default_rng(seed).choice(n, size=max_reference, replace=False))
            reference = z[keep].astype(np.float32)
            position = np.full(n, -1)
            position[keep] = np.arange(len(keep))
            calibration = "leave-one-out"
            scores = _kth_distance(z, reference, k, exclude=position)
            arrays = {"reference": reference}
            extra = {"k": k, "n_reference": len(keep)}
        else:  # mahalanobis
            counts = np.bincount(labels, minlength=num_classes)
            if counts.min() < _MIN_FOLDS:
                raise OODError(
                    f"mahalanobis needs at least {_MIN_FOLDS} fitting images of every class; "
                    f"class(es) {np.flatnonzero(counts < _MIN_FOLDS).tolist()} have fewer"
                )
            scores = _cross_fitted_mahalanobis(z, labels, num_classes, min(_FOLDS, int(counts.min())), seed)
            calibration = "cross-fitted"
            arrays, shrinkage = _fit_mahalanobis(z, labels, num_classes)
            extra = {"shrinkage": shrinkage}

        threshold = float(np.quantile(scores, 1.0 - target_rejection)) if target_rejection > 0 else float(scores.max())
        summary = OODSummary(
            threshold=threshold,
            measured_rejection_rate=float((scores > threshold).mean()),
            calibration=calibration,
            file=OOD_FILE if arrays else None,
            **common,
            **extra,
        )
        return cls(summary=summary, arrays=arrays)

    def score(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(N,) float64 scores for one forward pass's outputs; higher = more out-of-distribution."""
        logits, embeddings = _check_outputs(logits, embeddings)
        s = self.summary
        if logits.shape[1] != s.num_classes or embeddings.shape[1] != s.embedding_dim:
            raise OODError(
                f"detector was fitted on {s.num_classes} classes and {s.embedding_dim}-d embeddings, got logits "
                f"{logits.shape} and embeddings {embeddings.shape}: it belongs to another model"
            )
        if s.method == "msp":
            return msp_score(logits)
        if s.method == "energy":
            return energy_score(logits)
        z = _l2_normalize(embeddings) if s.normalize else embeddings
        if s.method == "knn":
            return _kth_distance(z, self.arrays["reference"], s.k)
        return _mahalanobis_from(self._float64, z)

    def flag(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(N,) bool: True where the image is out-of-distribution (score > threshold)."""
        return self.score(logits, embeddings) > self.threshold

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> list[str]:
        """Write the arrays (if the method has any) as `directory/ood.npz`; returns the file names written."""
        if not self.arrays:
            return []
        path = Path(directory) / OOD_FILE
        arrays = {"method": np.array(self.method)} | self.arrays
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
        return [OOD_FILE]

    @classmethod
    def load(cls, directory: str | Path, summary: OODSummary) -> "OODDetector":
        """The detector described by `summary` (from the manifest), with its arrays read from `directory`."""
        expected = _ARRAYS[summary.method]
        if not expected:
            return cls(summary=summary)
        if summary.file is None:
            raise OODError(f"OOD summary for method {summary.method!r} names no file with its parameters")
        path = Path(directory) / summary.file
        if not path.is_file():
            raise OODError(f"{path} is missing: the {summary.method} OOD detector cannot be loaded")
        shapes = _expected_shapes(summary)
        _check_npz_before_loading(path, summary.method, {"method": ((), "U")} | {name: (shape, "f") for name, shape in shapes.items()})
        try:
            with np.load(path) as data:  # numpy's default allow_pickle=False: no object arrays are unpickled
                stored = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise OODError(f"{path} is not a readable OOD parameter file: {exc}") from None
        if str(stored.get("method")) != summary.method or not set(expected) <= set(stored):
            raise OODError(f"{path} holds parameters for {stored.get('method')!s} (arrays {sorted(stored)}), "
                           f"not for the manifest's {summary.method} detector")
        arrays = {name: stored[name] for name in expected}
        for name, shape in shapes.items():
            if arrays[name].shape != shape or not np.isfinite(arrays[name]).all():
                raise OODError(f"{path}: array {name!r} has shape {arrays[name].shape} (or non-finite values); "
                               f"the manifest's summary implies {shape}")
        return cls(summary=summary, arrays=arrays)


def _expected_shapes(summary: OODSummary) -> dict[str, tuple[int, ...]]:
    """The arrays `summary`'s method stores, with the shapes its counts imply."""
    if summary.method == "knn":
        if summary.n_reference is None or summary.k is None:
            raise OODError("the knn OOD summary lacks n_reference or k")
        return {"reference": (summary.n_reference, summary.embedding_dim)}
    return {"means": (summary.num_classes, summary.embedding_dim),
            "precision": (summary.embedding_dim, summary.embedding_dim),
            "mean_norms": (summary.num_classes,)}


def _check_npz_before_loading(path: Path, method: str, wanted: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Refuse an `ood.npz` whose members are not exactly `wanted` (name -> (shape, dtype kind)) or would allocate
    more than MAX_OOD_BYTES, reading only the zip directory and each array's .npy header. numpy allocates what a
    header declares and zipfile inflates no more than a member's declared size, so these bound the load."""
    budget = sum(int(np.prod(shape, dtype=np.int64)) * 8 for shape, _ in wanted.values())
    if budget > MAX_OOD_BYTES:
        raise OODError(f"{path}: the manifest's OOD summary implies {budget / 2**20:.0f} MiB of parameters, more than "
                       f"the {MAX_OOD_BYTES // 2**20} MiB allowed")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            names = {f"{name}.npy" for name in wanted}
            if set(members) != names:
                raise OODError(f"{path} holds the arrays {sorted(members)[:5]}, not for the manifest's {method} detector "
                               f"(which stores exactly {sorted(names)})")
            for name, (shape, kind) in wanted.items():
                info = members[f"{name}.npy"]
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise OODError(f"{path}: {name}.npy has .npy format version {version}")
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    found_shape, _, dtype = read_header(member, max_header_size=_NPY_HEADER_BYTES)
                if tuple(found_shape) != shape or dtype.kind != kind or dtype.hasobject:
                    raise OODError(f"{path}: {name}.npy declares shape {found_shape} of {dtype}; the manifest's "
                                   f"summary implies shape {shape} of kind {kind!r}")
                if info.file_size > int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + _NPY_HEADER_BYTES:
                    raise OODError(f"{path}: {name}.npy declares {info.file_size} bytes, more than its shape holds")
    except OODError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise OODError(f"{path} is not a readable OOD parameter file: {exc}") from None


def _cross_fitted_mahalanobis(z: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, seed: int) -> np.ndarray:
    """Each point's score under means/covariance fitted without its fold (stratified, so every class is in each fit)."""
    from sklearn.model_selection import StratifiedKFold

    scores = np.empty(len(z))
    for fit_rows, held_rows in StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, labels):
        arrays, _ = _fit_mahalanobis(z[fit_rows], labels[fit_rows], num_classes)
        scores[held_rows] = _mahalanobis_from(arrays, z[held_rows])
    return scores


# -------------------------------------------------------------------------------------- evaluation
def evaluate_ood(id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float) -> OODEvaluation:
    """AUROC and FPR at 95% TPR of separating OOD (positive) from ID scores, and the shares flagged at `threshold`."""
    from sklearn.metrics import roc_auc_score, roc_curve

    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise OODError(f"need ID and OOD scores, got {len(id_scores)} and {len(ood_scores)}")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise OODError("scores contain NaN or infinite values")
    truth = np.concatenate([np.zeros(len(id_scores)), np.ones(len(ood_scores))])
    scores = np.concatenate([id_scores, ood_scores])
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    return OODEvaluation(
        auroc=float(roc_auc_score(truth, scores)),
        fpr_at_95_tpr=float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        flagged_share_id=float((id_scores > threshold).mean()),
        flagged_share_ood=float((ood_scores > threshold).mean()),
        id_images=len(id_scores),
        ood_images=len(ood_scores),
    )
