"""Inference stage of the extraction job: a callable class holding one loaded runtime.

Shaped like Ray Data's batch-inference callables: the constructor loads the model once (per process or
per Ray actor) and `__call__` maps a column batch to a column batch. The local engine calls the same
class directly. Embeddings and probabilities come from `Predictor.predict_batch`, the path the HTTP
service's `embed` and `classify` use, and the top-k order from `Predictor.top_k_indices`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extraction.config import EmbeddingDType
from models.inference import DEFAULT_TOP_K, InferenceOptions, cap_top_k
from models.predictor import Predictor


class EmbeddingPredictor:
    """`{"index", "path", "pixels", "error"}` -> `{"index", "path", "error", "embedding", "topk_indices",
    "topk_probabilities"}` (+ `"ood_score"`, `"unknown"` when the artifact has an OOD detector). Rows whose
    `error` is set skip the model and get zero outputs."""

    def __init__(
        self,
        artifact: str | Path,
        options: InferenceOptions | dict | None = None,
        top_k: int = DEFAULT_TOP_K,
        embedding_dtype: EmbeddingDType = "float32",
    ) -> None:
        self.predictor = Predictor.from_artifact(artifact, InferenceOptions.model_validate(options or {}))
        self.top_k = cap_top_k(top_k, self.predictor.manifest.num_classes)
        self.embedding_dtype = np.dtype(embedding_dtype)

    def describe(self) -> dict[str, str]:
        return self.predictor.runtime.describe()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.asarray(batch["error"], dtype=object).reshape(-1)
        count = len(errors)
        ok = np.array([not e for e in errors], dtype=bool)
        embeddings = np.zeros((count, self.predictor.manifest.embedding_dim), dtype=self.embedding_dtype)
        topk_indices = np.zeros((count, self.top_k), dtype=np.int32)
        topk_probabilities = np.zeros((count, self.top_k), dtype=np.float32)
        ood_scores = np.zeros(count, dtype=np.float64)
        unknown = np.zeros(count, dtype=bool)
        if ok.any():
            pixels = np.asarray(batch["pixels"], dtype=np.float32)[ok]
            outputs = self.predictor.predict_batch(pixels)
            embeddings[ok] = outputs.embeddings.astype(self.embedding_dtype)
            best = self.predictor.top_k_indices(outputs.probabilities, self.top_k)
            topk_indices[ok] = best
            topk_probabilities[ok] = np.take_along_axis(outputs.probabilities, best, axis=1)
            if outputs.ood_scores is not None:
                ood_scores[ok], unknown[ok] = outputs.ood_scores, outputs.unknown
        columns = {
            "index": np.asarray(batch["index"], dtype=np.int64).reshape(-1),
            "path": np.asarray(batch["path"], dtype=object).reshape(-1),
            "error": errors,
            "embedding": embeddings,
            "topk_indices": topk_indices,
            "topk_probabilities": topk_probabilities,
        }
        if self.predictor.ood is not None:
            columns |= {"ood_score": ood_scores, "unknown": unknown}
        return columns
