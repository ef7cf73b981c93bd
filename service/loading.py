"""Find the artifact the settings name, load it on the configured runtime and device, and warm it up."""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
from PIL import Image

from bentoml.exceptions import BentoMLException

from models.artifact import ArtifactError, read_manifest
from models.preprocessing import Preprocessing
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


def load_predictor(settings: ServiceSettings, stored_model: bentoml.Model | None) -> Predictor:
    directory = artifact_dir(settings, stored_model)
    predictor = Predictor.from_artifact(directory, settings.inference_options(), expected_digest=settings.expect_digest)
    manifest = predictor.manifest
    logger.info(
        "serving %s %s (%s, artifact %s) with %s",
        manifest.name, manifest.version, manifest.backbone, predictor.digest, predictor.runtime.describe(),
    )  # fmt: skip
    return predictor


def served_preprocessing(settings: ServiceSettings) -> Preprocessing | None:
    """The preprocessing of the artifact the settings name, read from its manifest alone: requests are parsed and
    decoded (with its decode path) before the model has loaded. None when no model is named or it cannot be
    read yet; loading the model then says why."""
    try:
        if settings.artifact is not None:
            return read_manifest(settings.artifact).preprocessing
        if settings.model is not None:
            return read_manifest(stored_artifact_dir(bentoml.models.get(settings.model))).preprocessing
    except (ArtifactError, BentoMLException, OSError):
        return None
    return None


def warm_up(predictor: Predictor, batches: int, batch_size: int) -> bool:
    """Run `batches` forward passes on blank images so the first requests do not pay for lazy initialisation
    (TorchScript profiling, cuDNN autotuning, ONNX Runtime arena growth). Returns True when done."""
    size = predictor.manifest.preprocessing.image_size
    blank = [Image.new("RGB", (size, size), (127, 127, 127))] * batch_size
    for _ in range(batches):
        predictor.predict(blank)
    return True
