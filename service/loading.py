"""Find the artifact the settings name, read and verify it once, load it on the configured runtime and device, and
warm it up. `transfer-serve serve` runs the same `open_artifact` + `load_predictor` before starting BentoML, so an
artifact the workers would refuse is refused there, with one line."""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
from PIL import Image

from bentoml.exceptions import BentoMLException

from models.artifact import Artifact, ArtifactError, load_artifact
from models.predictor import Predictor
from service.model_store import stored_artifact_dir
from service.settings import ServiceSettings

logger = logging.getLogger("bentoml.transfer_serve")


def artifact_dir(settings: ServiceSettings, stored_model: bentoml.Model | None) -> Path:
    if settings.artifact is not None:
        return settings.artifact
    if stored_model is not None:
        return stored_artifact_dir(stored_model)
    raise ArtifactError(
        "no model to serve: set TRANSFER_SERVE_ARTIFACT to an artifact directory, or TRANSFER_SERVE_MODEL "
        "to a model-store tag (see `transfer-serve import`)"
    )


def open_artifact(settings: ServiceSettings, stored_model: bentoml.Model | None) -> Artifact:
    """The artifact the settings name, read and verified (hashes, digest pin, manifest values): once per process."""
    return load_artifact(artifact_dir(settings, stored_model), settings.expect_digest)


def served_artifact(settings: ServiceSettings) -> Artifact | None:
    """`open_artifact` at the service module's import, where requests' limits need the model's preprocessing before
    the model loads (and `bentoml build` imports the module with no model at hand): None when it cannot be opened
    yet; the worker's `open_artifact` then says why."""
    try:
        stored_model = bentoml.models.get(settings.model) if settings.model is not None else None
        return open_artifact(settings, stored_model)
    except (ArtifactError, BentoMLException, OSError):
        return None


def load_predictor(settings: ServiceSettings, artifact: Artifact) -> Predictor:
    """The artifact on the runtime, device and precision the settings resolve to, checked against its network."""
    predictor = Predictor.from_loaded(artifact, settings)
    manifest = predictor.manifest
    logger.info(
        "serving %s %s (%s, artifact %s) with %s",
        manifest.name, manifest.version, manifest.backbone, predictor.digest, predictor.runtime.describe(),
    )  # fmt: skip
    return predictor


def warm_up(predictor: Predictor, batches: int, batch_size: int) -> bool:
    """Run `batches` forward passes on blank images so the first requests do not pay for lazy initialisation
    (TorchScript profiling, cuDNN autotuning, ONNX Runtime arena growth). Returns True when done."""
    size = predictor.manifest.preprocessing.image_size
    blank = [Image.new("RGB", (size, size), (127, 127, 127))] * batch_size
    for _ in range(batches):
        predictor.predict(blank)
    return True
