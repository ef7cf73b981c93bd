"""The versioned model artifact: a directory holding `manifest.json`, `model.ts` and `model.onnx` (and
`ood.npz` when an out-of-distribution detector was fitted at training time, see docs/OOD.md).

The manifest is the contract between export and every consumer (service, batch job, evaluation):
labels, preprocessing, embedding size, metrics, parity figures, library versions and the sha256 of
every file. `load_artifact` refuses an artifact whose files do not match their hashes or whose format
version this code does not read.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.ood import OODSummary
from models.preprocessing import Preprocessing

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TORCHSCRIPT_FILE = "model.ts"
ONNX_FILE = "model.onnx"


class ArtifactError(RuntimeError):
    """The artifact is missing, tampered with, or of a format this code cannot read."""


class ParityReport(BaseModel):
    """How closely the exported forms reproduce the eager PyTorch model on real preprocessed images."""

    images: int
    torchscript_max_abs_logits: float
    torchscript_max_abs_embedding: float
    onnx_max_abs_logits: float
    onnx_max_abs_embedding: float
    top1_agreement: float = Field(description="Fraction of images where every form gives the same top-1.")
    tolerance: float = Field(description="Allowed max |logit difference| per unit of logit scale.")
    logit_scale: float = Field(description="max(1, largest |logit| of the eager model on these images).")

    @property
    def allowed_max_abs_logits(self) -> float:
        return self.tolerance * self.logit_scale


class Manifest(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    backbone: str
    labels: list[str]
    preprocessing: Preprocessing
    embedding_dim: int
    metrics: dict[str, float] = Field(default_factory=dict)
    parity: ParityReport
    onnx_opset: int
    files: dict[str, str] = Field(description="sha256 of every file in the artifact, by file name.")
    library_versions: dict[str, str]
    ood: OODSummary | None = Field(
        default=None,
        description="The out-of-distribution detector fitted at training time (models/ood.py); its file, if any, is "
        "listed in `files`. None for artifacts exported without one (before phase 2, or `--ood-method none`): "
        "they load and serve, without an OOD score.",
    )

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class Artifact(BaseModel):
    """A verified artifact on disk."""

    path: Path
    manifest: Manifest
    digest: str = Field(
        description="The artifact's identity: 'sha256:' + the hash of manifest.json, which holds every other "
        "file's hash, so any edit to any file (the manifest included) changes it."
    )

    @property
    def torchscript_path(self) -> Path:
        return self.path / TORCHSCRIPT_FILE

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(directory: str | Path) -> str:
    """'sha256:<hex>' of the manifest file as written: the artifact's identity (see `Artifact.digest`)."""
    return f"sha256:{sha256_file(Path(directory) / MANIFEST_FILE)}"


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a model artifact: {MANIFEST_FILE} is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is not supported (this code reads version {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{path} does not match the manifest schema: {exc}") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    for required in (TORCHSCRIPT_FILE, ONNX_FILE):
        if required not in manifest.files:
            raise ArtifactError(f"{directory}: manifest lists no hash for {required}")
    if manifest.ood is not None and manifest.ood.file is not None and manifest.ood.file not in manifest.files:
        raise ArtifactError(f"{directory}: manifest lists no hash for the OOD file {manifest.ood.file}")
    for name, expected in manifest.files.items():
        if Path(name).name != name:
            raise ArtifactError(f"{directory}: manifest names a file outside the artifact: {name!r}")
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{directory}: {name} does not match its manifest hash (expected {expected[:12]}…, "
                f"found {actual[:12]}…); the artifact was modified or corrupted and is refused"
            )


def load_artifact(directory: str | Path, expected_digest: str | None = None) -> Artifact:
    """Read and verify an artifact directory; raises ArtifactError on any mismatch, and when `expected_digest`
    is given and the artifact's digest differs (a pinned deployment refuses an edited artifact)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}")
    manifest = read_manifest(directory)
    digest = manifest_digest(directory)
    if expected_digest is not None and digest != expected_digest.strip():
        raise ArtifactError(
            f"{directory}: artifact digest is {digest}, not the expected {expected_digest.strip()}; "
            "the artifact was edited or is another one, and is refused"
        )
    verify_files(directory, manifest)
    return Artifact(path=directory, manifest=manifest, digest=digest)
