"""The versioned model artifact: a directory holding `manifest.json`, `model.ts` and `model.onnx` (and
`ood.npz` when an out-of-distribution detector was fitted at training time, see docs/OOD.md).

The manifest is the contract between export and every consumer (service, batch job, evaluation):
labels, preprocessing, embedding size, metrics, parity figures, library versions and the sha256 of
every file. `load_artifact` refuses an artifact whose files do not match their hashes, resolve outside its
directory, or whose format version this code does not read; the manifest's values are validated when it is
read (bounded size, unique non-empty labels, finite preprocessing: see `Manifest`), since a hash pin is optional
and an edited manifest must not be served with broken answers.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from models.ood import OODSummary
from models.preprocessing import Preprocessing

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TORCHSCRIPT_FILE = "model.ts"
ONNX_FILE = "model.onnx"

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
"""manifest.json is read whole; a larger one (millions of labels) is refused before it is parsed."""
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
MAX_EMBEDDING_DIM = 16_384

Label = Annotated[str, StringConstraints(strip_whitespace=False, min_length=1, max_length=MAX_LABEL_CHARS)]


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
    labels: list[Label] = Field(min_length=2, max_length=MAX_LABELS, description="Class names, unique, in logit order.")
    preprocessing: Preprocessing
    embedding_dim: int = Field(gt=0, le=MAX_EMBEDDING_DIM)
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

    @field_validator("labels")
    @classmethod
    def _distinct_visible_labels(cls, labels: list[str]) -> list[str]:
        """A blank label answers nothing readable, and two equal labels make two classes indistinguishable."""
        blank = [i for i, label in enumerate(labels) if not label.strip()]
        if blank:
            raise ValueError(f"labels must not be blank (positions {blank[:5]})")
        seen: set[str] = set()
        repeated = [label for label in labels if label in seen or seen.add(label)]
        if repeated:
            raise ValueError(f"labels must be unique; repeated: {sorted(set(repeated))[:5]}")
        return labels

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


def inside_artifact(directory: Path, name: str) -> Path:
    """`directory/name` when it is a regular file of the artifact itself: not a symlink or a path leading out of
    the folder (a hash check reads whatever a link points at, so a linked file would pass it and a pin)."""
    path = directory / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise ArtifactError(f"{directory}: manifest names a file outside the artifact: {name!r}")
    if path.is_symlink() or path.resolve().parent != directory.resolve():
        raise ArtifactError(f"{directory}: {name} is a symbolic link or resolves outside the artifact; refused")
    if not path.is_file():
        raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing (or not a regular file)")
    return path


def _manifest_text(directory: Path) -> str:
    if not (directory / MANIFEST_FILE).exists() and not (directory / MANIFEST_FILE).is_symlink():
        raise ArtifactError(f"{directory} is not a model artifact: {MANIFEST_FILE} is missing")
    path = inside_artifact(directory, MANIFEST_FILE)
    with open(path, "rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB; refused unread")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not UTF-8 text: {exc}") from None


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        raw = json.loads(_manifest_text(directory))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is not supported (this code reads version {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise ArtifactError(f"{path} does not match the manifest schema: {problems}{more}") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    for required in (TORCHSCRIPT_FILE, ONNX_FILE):
        if required not in manifest.files:
            raise ArtifactError(f"{directory}: manifest lists no hash for {required}")
    if manifest.ood is not None and manifest.ood.file is not None and manifest.ood.file not in manifest.files:
        raise ArtifactError(f"{directory}: manifest lists no hash for the OOD file {manifest.ood.file}")
    for name, expected in manifest.files.items():
        actual = sha256_file(inside_artifact(directory, name))
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
