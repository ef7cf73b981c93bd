"""Artifacts in BentoML's model store: `transfer-serve import ARTIFACT` puts one there; a Bento packs it.

A stored model is the artifact directory unchanged (manifest.json, model.ts, model.onnx) under a tag made
from the manifest's name and version, with the manifest as the model's metadata, so `bentoml models get`
shows labels, metrics and parity without loading anything.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from models.artifact import MANIFEST_FILE, ArtifactError, Manifest, load_artifact

STORE_LABELS = {"kind": "transfer-serve-artifact"}


def tag_part(text: str) -> str:
    """`text` as a valid BentoML tag name or version: lower case, [a-z0-9._-], starting and ending alphanumeric."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    if not cleaned:
        raise ArtifactError(f"cannot make a model-store tag from {text!r}")
    return cleaned[:63]


def store_tag(manifest: Manifest, name: str | None = None) -> str:
    return f"{tag_part(name or manifest.name)}:{tag_part(manifest.version)}"


def import_artifact(path: str | Path, name: str | None = None) -> bentoml.Model:
    """Verify an artifact and copy it into the model store; importing the same artifact again is a no-op."""
    artifact = load_artifact(path)
    manifest = artifact.manifest
    tag = store_tag(manifest, name)
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("files") != manifest.files:
            raise ArtifactError(f"the model store already holds a different model tagged {tag}")
        return existing
    with bentoml.models.create(tag, labels=STORE_LABELS, metadata=manifest.model_dump(mode="json", exclude_none=True)) as model:
        for file_name in [MANIFEST_FILE, *manifest.files]:
            shutil.copy2(artifact.path / file_name, model.path_of(file_name))
    return bentoml.models.get(tag)


def stored_artifact_dir(model: bentoml.Model) -> Path:
    """The artifact directory inside a stored model (verified again by `load_artifact` when loaded)."""
    directory = Path(model.path)
    if not (directory / MANIFEST_FILE).is_file():
        raise ArtifactError(f"model {model.tag} in the model store is not a transfer-serve artifact")
    return directory
