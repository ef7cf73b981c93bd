"""Images in, probabilities and embeddings out: preprocessing + runtime + labels, for the service and the job."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from models.artifact import Artifact, ArtifactError, Manifest, load_artifact
from models.ood import OODDetector, OODError
from models.preprocessing import preprocess_batch
from models.inference import InferenceFields, InferenceOptions, ResolvedInference, cap_top_k, resolve_inference
from models.runtimes import Runtime, load_runtime


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class NonFiniteOutputError(RuntimeError):
    """The runtime answered NaN or infinity (a broken model file, a reduced-precision overflow)."""


@dataclass(frozen=True)
class Outputs:
    probabilities: np.ndarray  # (N, num_classes) float32
    embeddings: np.ndarray  # (N, embedding_dim) float32
    ood_scores: np.ndarray | None = None  # (N,) float64, higher = more out-of-distribution; None: no detector
    unknown: np.ndarray | None = None  # (N,) bool, ood_scores > the detector's threshold; None: no detector


@dataclass(frozen=True)
class TopK:
    labels: list[str]
    probabilities: list[float]


@functools.cache
def single_threaded_blas() -> None:
    """Run numpy's BLAS on one thread in this process, once (called when a Predictor with an OOD detector is
    built): right after a forward pass the runtime's threads still spin on every core, and a multi-threaded
    BLAS product fighting them took many times longer (measured at 32 px, batch 32: +64% of predict_batch for a
    24-row kNN reference with BLAS on 2 threads, +4% on one; docs/OOD.md#latency). Only numpy's BLAS is
    limited (torch and ONNX Runtime keep their own thread pools); a per-call limit cost ~1.5 ms itself."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn's dependency; without it BLAS keeps its threads
        return
    threadpool_limits(limits=1, user_api="blas")


def load_ood(directory: Path, manifest: Manifest) -> OODDetector | None:
    """The artifact's OOD detector (its file already hash-checked by `load_artifact`), or None when the manifest
    has none (an artifact from before the detector, or trained with `--ood-method none`)."""
    if manifest.ood is None:
        return None
    try:
        return OODDetector.load(directory, manifest.ood)
    except OODError as exc:
        raise ArtifactError(f"{directory}: {exc}; the artifact is refused") from None


class Predictor:
    """One loaded artifact ready for inference: `predict(images)` runs one forward pass for the batch."""

    def __init__(
        self,
        manifest: Manifest,
        runtime: Runtime,
        digest: str | None = None,
        ood: OODDetector | None = None,
        inference: ResolvedInference | None = None,
    ) -> None:
        self.manifest = manifest
        self.runtime = runtime
        self.digest = digest
        self.ood = ood
        self.inference = inference
        """The runtime, device and precision the options resolved to (None for a runtime built by hand)."""
        if ood is not None:
            single_threaded_blas()

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        options: InferenceFields = InferenceOptions(),
        cuda_available: bool | None = None,
        expected_digest: str | None = None,
    ) -> "Predictor":
        """Load (and verify) an artifact on the runtime, device and precision `options` resolve to; refuse it when
        its digest is not `expected_digest` (if given) or its manifest does not describe its network."""
        return cls.from_loaded(load_artifact(path, expected_digest), options, cuda_available)

    @classmethod
    def from_loaded(
        cls, artifact: Artifact, options: InferenceFields = InferenceOptions(), cuda_available: bool | None = None
    ) -> "Predictor":
        """`from_artifact` for an artifact already read and verified by `load_artifact` (its manifest is not read
        again): its OOD detector and runtime are loaded and checked against the manifest."""
        ood = load_ood(artifact.path, artifact.manifest)
        inference = resolve_inference(options, cuda_available)
        predictor = cls(artifact.manifest, load_runtime(artifact, inference), artifact.digest, ood, inference)
        predictor.check_manifest_matches_network()
        return predictor

    def check_manifest_matches_network(self) -> None:
        """One forward pass on a blank image: the network must answer one logit per manifest label and an
        embedding of the manifest's size (an edited manifest would otherwise serve wrong or failing answers)."""
        size = self.manifest.preprocessing.image_size
        try:
            logits, embeddings = self.runtime(np.zeros((1, 3, size, size), dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime and TorchScript raise their own types
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(
                f"the network refuses the manifest's {size}x{size} input ({first_line}); the artifact is inconsistent "
                "and is refused"
            ) from None
        if not (np.isfinite(logits).all() and np.isfinite(embeddings).all()):
            raise ArtifactError("the network answers NaN or infinite values on a blank image; the artifact is refused")
        if logits.shape != (1, self.manifest.num_classes):
            raise ArtifactError(
                f"the manifest lists {self.manifest.num_classes} labels but the network answers {logits.shape[-1]} "
                "logits; the artifact is inconsistent and is refused"
            )
        if embeddings.shape != (1, self.manifest.embedding_dim):
            raise ArtifactError(
                f"the manifest says embedding size {self.manifest.embedding_dim} but the network answers "
                f"{embeddings.shape[-1]}; the artifact is inconsistent and is refused"
            )

        if self.ood is not None:
            summary = self.ood.summary
            if (summary.num_classes, summary.embedding_dim) != (self.manifest.num_classes, self.manifest.embedding_dim):
                raise ArtifactError(
                    f"the OOD detector was fitted on {summary.num_classes} classes and {summary.embedding_dim}-d "
                    f"embeddings, not this model's {self.manifest.num_classes} and {self.manifest.embedding_dim}; "
                    "the artifact is inconsistent and is refused"
                )

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return preprocess_batch(images, self.manifest.preprocessing)

    def predict_batch(self, batch: np.ndarray) -> Outputs:
        """One forward pass; the OOD score (when the artifact has a detector) comes from the same pass's raw
        logits and embeddings, with no second model call."""
        logits, embeddings = self.runtime(batch)
        scores, unknown = self.ood_scores(logits, embeddings)
        return Outputs(
            probabilities=softmax(logits.astype(np.float32)),
            embeddings=embeddings.astype(np.float32),
            ood_scores=scores,
            unknown=unknown,
        )

    def ood_scores(self, logits: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(scores, unknown flags) of one forward pass's outputs, or (None, None) without a detector. A row with
        non-finite outputs (a reduced-precision overflow) scores NaN and is flagged unknown."""
        if self.ood is None:
            return None, None
        logits, embeddings = np.asarray(logits), np.asarray(embeddings)
        finite = np.isfinite(logits).all(axis=1) & np.isfinite(embeddings).all(axis=1)
        scores = np.full(len(logits), np.nan)
        if finite.any():
            scores[finite] = self.ood.score(logits[finite], embeddings[finite])
        return scores, ~finite | (scores > self.ood.threshold)

    def predict(self, images: Sequence[Image.Image]) -> Outputs:
        return self.predict_batch(self.preprocess(images))

    def predict_finite(self, images: Sequence[Image.Image]) -> Outputs:
        """`predict`, refusing a batch with a NaN or infinite output (`NonFiniteOutputError`): an answer must never
        carry a null probability (the batch job instead keeps such rows, scored NaN and flagged unknown)."""
        outputs = self.predict(images)
        finite = np.isfinite(outputs.probabilities).all(axis=1) & np.isfinite(outputs.embeddings).all(axis=1)
        if not finite.all():
            raise NonFiniteOutputError(
                f"the model produced NaN or infinite outputs for {int((~finite).sum())} of {len(finite)} images "
                f"(runtime {self.runtime.describe()}); no answer is given"
            )
        return outputs

    def top_k_indices(self, probabilities: np.ndarray, k: int) -> np.ndarray:
        """(N, k') class indices, most probable first; k' = k capped to [1, number of classes]."""
        k = cap_top_k(k, len(self.labels))
        return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]

    def top_k(self, probabilities: np.ndarray, k: int) -> list[TopK]:
        order = self.top_k_indices(probabilities, k)
        return [
            TopK(labels=[self.labels[i] for i in row], probabilities=[float(p[i]) for i in row])
            for row, p in zip(order, probabilities)
        ]
