"""Every shape that crosses HTTP: request options, documented request bodies, responses, errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.artifact import Manifest
from models.inference import DEFAULT_TOP_K
from models.ood import OODSummary
from models.predictor import Predictor, TopK
from models.preprocessing import Preprocessing

UNKNOWN_LABEL = "unknown"
"""The label /classify answers first for a flagged image when asked (`unknown_label`, TRANSFER_SERVE_UNKNOWN_AS_LABEL)."""

# --- requests --------------------------------------------------------------------------------------------------


class ClassifyOptions(BaseModel):
    """What a /classify caller may set besides the images."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(DEFAULT_TOP_K, ge=1, description="Labels returned per image, capped at the number of classes.")
    unknown_label: bool | None = Field(
        None,
        description=f"Answer the label '{UNKNOWN_LABEL}' first for an image the model's out-of-distribution detector "
        "flags (default: the server's TRANSFER_SERVE_UNKNOWN_AS_LABEL). No effect for a model without a detector.",
    )


class EmbedOptions(BaseModel):
    """What an /embed caller may set besides the images."""

    model_config = ConfigDict(extra="forbid")

    normalize: bool = Field(False, description="L2-normalise each embedding (for cosine similarity).")


_IMAGE_FILES = Field(
    description="One or more image files (JPEG, PNG, WEBP, BMP, GIF, TIFF), repeated under the same field name.",
    json_schema_extra={"items": {"type": "string", "format": "binary"}},
)


class ClassifyForm(ClassifyOptions):
    """multipart/form-data body of /classify."""

    images: list[bytes] = _IMAGE_FILES


class EmbedForm(EmbedOptions):
    """multipart/form-data body of /embed."""

    images: list[bytes] = _IMAGE_FILES


# --- responses -------------------------------------------------------------------------------------------------


class ModelRef(BaseModel):
    name: str
    version: str

    @classmethod
    def of(cls, manifest: Manifest) -> "ModelRef":
        return cls(name=manifest.name, version=manifest.version)


class LabelScore(BaseModel):
    label: str
    probability: float | None = Field(description=f"null only for the label '{UNKNOWN_LABEL}' (it has no probability).")


class ImagePrediction(BaseModel):
    top_k: list[LabelScore] = Field(
        description=f"Most probable labels first; with unknown_label, '{UNKNOWN_LABEL}' first for a flagged image."
    )
    ood_score: float | None = Field(
        None,
        description="Out-of-distribution score (higher = less like the training images; docs/OOD.md); null when "
        "the model has no detector.",
    )
    unknown: bool | None = Field(
        None, description="ood_score is above the model's threshold; null when the model has no detector."
    )


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelRef
    predictions: list[ImagePrediction] = Field(description="One per image, in request order.")

    @classmethod
    def for_image(
        cls,
        model: ModelRef,
        top: TopK,
        ood_score: float | None = None,
        unknown: bool | None = None,
        unknown_as_label: bool = False,
    ) -> "ClassifyResponse":
        """One image's answer; `unknown_as_label` puts the label 'unknown' first (keeping top_k entries in all)
        when the image is flagged. A NaN score (non-finite outputs) is answered as null."""
        scores = [LabelScore(label=label, probability=p) for label, p in zip(top.labels, top.probabilities)]
        if unknown and unknown_as_label:
            scores = [LabelScore(label=UNKNOWN_LABEL, probability=None)] + scores[: max(0, len(scores) - 1)]
        if ood_score is not None and not np.isfinite(ood_score):
            ood_score = None
        prediction = ImagePrediction(top_k=scores, ood_score=ood_score, unknown=unknown)
        return cls(model=model, predictions=[prediction])

    @classmethod
    def merge(cls, parts: Sequence["ClassifyResponse"]) -> "ClassifyResponse":
        """One request's answer from the one-image answers the batch produced for it."""
        return cls(model=parts[0].model, predictions=[p for part in parts for p in part.predictions])


class EmbedResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelRef
    dim: int = Field(description="Length of every embedding.")
    normalized: bool
    embeddings: list[list[float]] = Field(description="float32 values, one vector per image, in request order.")

    @classmethod
    def for_image(cls, model: ModelRef, vector: np.ndarray, normalized: bool) -> "EmbedResponse":
        return cls(model=model, dim=int(vector.shape[0]), normalized=normalized, embeddings=[vector.tolist()])

    @classmethod
    def merge(cls, parts: Sequence["EmbedResponse"]) -> "EmbedResponse":
        first = parts[0]
        return cls(
            model=first.model,
            dim=first.dim,
            normalized=first.normalized,
            embeddings=[vector for part in parts for vector in part.embeddings],
        )


class RequestLimits(BaseModel):
    max_images_per_request: int
    max_pixels: int
    max_request_decode_bytes: int
    max_body_bytes: int
    max_batch_size: int
    max_latency_ms: int
    allow_url_fetch: bool


class ModelMetadata(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelRef
    digest: str | None = Field(description="The artifact's identity: sha256 of its manifest (pin it with TRANSFER_SERVE_EXPECT_DIGEST).")
    backbone: str
    labels: list[str]
    num_classes: int
    embedding_dim: int
    preprocessing: Preprocessing
    metrics: dict[str, float] = Field(description="Held-out test metrics recorded at export.")
    runtime: dict[str, str] = Field(description="Runtime, device, precision or ONNX Runtime providers in use.")
    limits: RequestLimits
    ood: OODSummary | None = Field(
        None,
        description="The out-of-distribution detector: method, threshold, target and measured rejection rates "
        "(docs/OOD.md); null for a model without one.",
    )
    unknown_as_label: bool = Field(
        False, description=f"Whether /classify answers '{UNKNOWN_LABEL}' first for flagged images by default."
    )

    @classmethod
    def describe(cls, predictor: Predictor, limits: RequestLimits, unknown_as_label: bool = False) -> "ModelMetadata":
        manifest = predictor.manifest
        return cls(
            model=ModelRef.of(manifest),
            digest=predictor.digest,
            backbone=manifest.backbone,
            labels=manifest.labels,
            num_classes=manifest.num_classes,
            embedding_dim=manifest.embedding_dim,
            preprocessing=manifest.preprocessing,
            metrics=manifest.metrics,
            runtime=predictor.runtime.describe(),
            limits=limits,
            ood=manifest.ood,
            unknown_as_label=unknown_as_label,
        )
