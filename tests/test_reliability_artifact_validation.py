"""Artifacts are validated before anything serves them (issue 21, item 3): edited manifests of every kind, files
that resolve outside the artifact, and `ood.npz` files built to allocate or unpickle are refused by the loader and
by `transfer-serve serve` (exit 2, one `error:` line, BentoML never started); and no answer carries a NaN.

Every corrupted artifact is generated here from the session's tiny artifact (tests/conftest.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from models.artifact import MAX_LABELS, MAX_MANIFEST_BYTES, ArtifactError, load_artifact, sha256_file
from models.predictor import NonFiniteOutputError, Predictor

Edit = Callable[[dict], None]


def _set(*keys: str, value: object) -> Edit:
    def edit(manifest: dict) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _labels(make: Callable[[list[str]], list[str]]) -> Edit:
    return lambda manifest: manifest.update(labels=make(manifest["labels"]))


MANIFEST_EDITS: dict[str, tuple[Edit, str]] = {
    "std zero": (_set("preprocessing", "std", value=[0.5, 0.0, 0.5]), "std"),
    "std negative": (_set("preprocessing", "std", value=[-0.5, 0.5, 0.5]), "std"),
    "std infinite": (_set("preprocessing", "std", value=[float("inf"), 0.5, 0.5]), "std"),
    "mean NaN": (_set("preprocessing", "mean", value=[float("nan"), 0.5, 0.5]), "mean"),
    "mean huge": (_set("preprocessing", "mean", value=[1e30, 0.5, 0.5]), "mean"),
    "image_size the ONNX graph rejects": (_set("preprocessing", "image_size", value=48), "refuses the manifest's 48x48"),
    "image_size huge": (_set("preprocessing", "image_size", value=100_000), "image_size"),
    "image_size zero": (_set("preprocessing", "image_size", value=0), "image_size"),
    "crop_pct tiny": (_set("preprocessing", "crop_pct", value=1e-9), "crop_pct"),
    "labels cut": (_labels(lambda labels: labels[:-1]), "inconsistent"),
    "duplicate label": (_labels(lambda labels: [labels[0]] * len(labels)), "unique"),
    "empty label": (_labels(lambda labels: [""] + labels[1:]), "labels"),
    "blank label": (_labels(lambda labels: ["   "] + labels[1:]), "blank"),
    "label too long": (_labels(lambda labels: ["x" * 10_000] + labels[1:]), "labels"),
    "too many labels": (_labels(lambda labels: [f"c{i}" for i in range(MAX_LABELS + 1)]), "labels"),
    "one label": (_labels(lambda labels: labels[:1]), "labels"),
    "embedding_dim zero": (_set("embedding_dim", value=0), "embedding_dim"),
    "ood threshold NaN": (lambda m: m["ood"].update(threshold=float("nan")) if m.get("ood") else None, "threshold"),
}


def copy_artifact(artifact_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(artifact_dir, target)
    return target


def edit_manifest(directory: Path, edit: Edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))  # json writes NaN and Infinity, as an editor could


@pytest.fixture()
def no_server_start(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """`serve` must refuse before it becomes BentoML: `os.execve` is recorded, never run."""
    started: list[list[str]] = []

    def execve(path, args, env):
        started.append(list(args))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    return started


def serve(directory: Path, *options: str):
    return CliRunner().invoke(cli.app, ["serve", str(directory), "--port", "9", *options])


def assert_one_error_line(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_an_edited_manifest_is_refused_by_the_loader_and_by_serve(artifact_dir: Path, tmp_path: Path, case: str,
                                                                  no_server_start: list) -> None:
    edit, fragment = MANIFEST_EDITS[case]
    if case == "ood threshold NaN" and json.loads((artifact_dir / "manifest.json").read_text()).get("ood") is None:
        pytest.skip("the session's artifact has no OOD detector")
    directory = copy_artifact(artifact_dir, tmp_path)
    edit_manifest(directory, edit)
    with pytest.raises(ArtifactError, match="refused|manifest schema|inconsistent") as refused:
        Predictor.from_artifact(directory)
    assert fragment in str(refused.value)
    assert_one_error_line(serve(directory), fragment)
    assert no_server_start == []


def test_a_manifest_over_the_size_limit_is_refused_unparsed(artifact_dir: Path, tmp_path: Path) -> None:
    directory = copy_artifact(artifact_dir, tmp_path)
    path = directory / "manifest.json"
    text = path.read_text()
    path.write_text(text[:-2] + " " * MAX_MANIFEST_BYTES + text[-2:])  # still valid JSON
    with pytest.raises(ArtifactError, match="larger than"):
        load_artifact(directory)


def _outside_copy(directory: Path, name: str, tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir(exist_ok=True)
    shutil.move(directory / name, outside)
    return outside


@pytest.mark.parametrize("name", ["model.onnx", "model.ts", "manifest.json"])
@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_a_file_linked_from_outside_is_refused_even_when_pinned(artifact_dir: Path, tmp_path: Path, name: str,
                                                                link: str, no_server_start: list) -> None:
    directory = copy_artifact(artifact_dir, tmp_path)
    digest = load_artifact(directory).digest
    outside = _outside_copy(directory, name, tmp_path)  # the same bytes: every hash, and the digest, still match
    os.symlink(outside if link == "absolute" else os.path.relpath(outside, directory), directory / name)
    assert sha256_file(directory / name) == sha256_file(outside)
    with pytest.raises(ArtifactError, match="symbolic link or resolves outside"):
        load_artifact(directory, expected_digest=digest)
    assert_one_error_line(serve(directory, "--expect-digest", digest), "symbolic link")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _zip_bomb(name: str, header_shape: tuple[int, int], declared_bytes: int) -> bytes:
    """A zip whose `name` member starts with a valid .npy header of `header_shape` float32 and then inflates to
    `declared_bytes` of zeros (a few hundred kB on disk)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": header_shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("method.npy", _npy(np.array("knn")))
        with archive.open(name, "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(declared_bytes >> 20):
                member.write(zeros)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _rehash(directory: Path, name: str) -> None:
    edit_manifest(directory, lambda manifest: manifest["files"].update({name: sha256_file(directory / name)}))


def _ood_cases(summary: dict) -> dict[str, tuple[Callable[[], bytes], str]]:
    n, dim = summary["n_reference"], summary["embedding_dim"]
    good = np.zeros((n, dim), dtype=np.float32)
    return {
        "pickled object array": (lambda: _npz({"method": np.array("knn"), "reference": np.array([{}] * n, dtype=object)}),
                                 "declares shape"),
        "header declares a huge shape": (lambda: _zip_bomb("reference.npy", (n * 100_000, dim), 1 << 20), "declares shape"),
        "member inflates past its shape": (lambda: _zip_bomb("reference.npy", (n, dim), 64 << 20), "more than its shape"),
        "extra member": (lambda: _npz({"method": np.array("knn"), "reference": good, "extra": good}), "not for the manifest"),
        "method array of the wrong kind": (
            lambda: _npz({"method": np.array([1, 2]), "reference": good}), "declares shape"),
        "not a zip": (lambda: b"PK\x03\x04" + os.urandom(1000), "not a readable OOD parameter file"),
    }


@pytest.fixture()
def knn_artifact(artifact_dir: Path) -> tuple[Path, dict]:
    summary = json.loads((artifact_dir / "manifest.json").read_text()).get("ood")
    if not summary or summary.get("method") != "knn":
        pytest.skip("the session's artifact has no knn OOD detector")
    return artifact_dir, summary


@pytest.mark.parametrize("case", ["pickled object array", "header declares a huge shape", "member inflates past its shape",
                                  "extra member", "method array of the wrong kind", "not a zip"])
def test_a_hostile_ood_file_is_refused_before_it_is_loaded(knn_artifact, tmp_path: Path, case: str,
                                                           no_server_start: list) -> None:
    import resource

    artifact_dir, summary = knn_artifact
    make, fragment = _ood_cases(summary)[case]
    directory = copy_artifact(artifact_dir, tmp_path)
    (directory / "ood.npz").write_bytes(make())
    _rehash(directory, "ood.npz")  # no pin: the hashes match what is there
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="refused") as refused:
        Predictor.from_artifact(directory)
    assert fragment in str(refused.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024  # KiB: no array was inflated
    assert_one_error_line(serve(directory), fragment)


def test_an_ood_summary_implying_gigabytes_is_refused(knn_artifact, tmp_path: Path) -> None:
    artifact_dir, _ = knn_artifact
    directory = copy_artifact(artifact_dir, tmp_path)
    edit_manifest(directory, lambda manifest: manifest["ood"].update(n_reference=10**9))
    with pytest.raises(ArtifactError, match="MiB of parameters"):
        Predictor.from_artifact(directory)


class NaNRuntime:
    """A runtime whose answers are NaN after the load-time check (a reduced-precision overflow, a broken kernel)."""

    name, device = "nan", "cpu"

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def __call__(self, batch: np.ndarray):
        logits, embeddings = self.runtime(batch)
        return np.full_like(logits, np.nan), embeddings

    def describe(self) -> dict[str, str]:
        return {"runtime": self.name}


def test_no_answer_carries_a_nan_probability(artifact_dir: Path) -> None:
    from PIL import Image

    loaded = Predictor.from_artifact(artifact_dir)
    broken = Predictor(loaded.manifest, NaNRuntime(loaded.runtime), loaded.digest, loaded.ood)
    size = loaded.manifest.preprocessing.image_size
    images = [Image.new("RGB", (size, size), (i, i, i)) for i in range(3)]
    assert np.isfinite(loaded.predict_finite(images).probabilities).all()
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite outputs for 3 of 3 images"):
        broken.predict_finite(images)
