import json
import shutil

import numpy as np
import pytest
import torch

import training.export as export
from models.artifact import ArtifactError, load_artifact
from models.network import build_network
from models.inference import InferenceOptions
from models.predictor import Predictor
from models.decoding import load_image
from training.data import discover_images


def _copy(artifact_dir, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(artifact_dir, target)
    return target


def test_parity_recorded_and_within_tolerance(artifact_dir):
    parity = load_artifact(artifact_dir).manifest.parity
    assert parity.images > 0 and parity.top1_agreement == 1.0
    assert parity.onnx_max_abs_logits <= parity.allowed_max_abs_logits
    assert parity.torchscript_max_abs_logits <= parity.allowed_max_abs_logits


def test_manifest_records_files_versions_and_preprocessing(artifact_dir):
    manifest = load_artifact(artifact_dir).manifest
    assert set(manifest.files) == {"model.ts", "model.onnx", "ood.npz"}  # ood.npz: the kNN detector (docs/OOD.md)
    assert {"torch", "onnx", "python"} <= set(manifest.library_versions)
    assert manifest.embedding_dim == 1280 and manifest.onnx_opset >= 17


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_runtimes_agree_with_each_other_on_real_images(artifact_dir, digits_dir, runtime):
    images = [load_image(r.path) for r in discover_images(digits_dir)[:8]]
    reference = Predictor.from_artifact(artifact_dir, InferenceOptions(runtime="torchscript")).predict(images)
    outputs = Predictor.from_artifact(artifact_dir, InferenceOptions(runtime=runtime)).predict(images)
    assert np.allclose(outputs.embeddings, reference.embeddings, atol=1e-4)
    assert (outputs.probabilities.argmax(1) == reference.probabilities.argmax(1)).all()


def test_top_k_is_capped_at_number_of_classes(artifact_dir, digits_dir):
    predictor = Predictor.from_artifact(artifact_dir)
    outputs = predictor.predict([load_image(discover_images(digits_dir)[0].path)])
    (top,) = predictor.top_k(outputs.probabilities, k=50)
    assert len(top.labels) == 4 and top.probabilities == sorted(top.probabilities, reverse=True)
    assert sum(top.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_tampered_model_file_is_refused(artifact_dir, tmp_path):
    target = _copy(artifact_dir, tmp_path)
    data = bytearray((target / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx does not match its manifest hash"):
        load_artifact(target)


def test_incompatible_format_version_is_refused(artifact_dir, tmp_path):
    target = _copy(artifact_dir, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["format_version"] = 99
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        load_artifact(target)


def test_missing_file_and_missing_manifest_are_refused(artifact_dir, tmp_path):
    target = _copy(artifact_dir, tmp_path)
    (target / "model.ts").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(target)
    (target / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifact(target)


def _batch(artifact_dir, digits_dir, n=4):
    predictor = Predictor.from_artifact(artifact_dir)
    return torch.from_numpy(predictor.preprocess([load_image(r.path) for r in discover_images(digits_dir)[:n]]))


def test_broken_export_is_caught_and_leaves_nothing(artifact_dir, digits_dir, tmp_path, monkeypatch):
    model = build_network("efficientnet_lite0", 4, weights="none").eval()
    real_export_onnx = export.export_onnx

    def export_a_different_model(m, example, path, opset=export.ONNX_OPSET):
        broken = build_network("efficientnet_lite0", 4, weights="none").eval()
        broken.load_state_dict(m.state_dict())
        with torch.no_grad():
            broken.head[-1].bias.add_(0.5)  # a wrong bias: small enough to keep top-1 on some images
        real_export_onnx(broken, example, path, opset)

    monkeypatch.setattr(export, "export_onnx", export_a_different_model)
    manifest = load_artifact(artifact_dir).manifest
    output = tmp_path / "out"
    with pytest.raises(export.ParityError, match="disagrees"):
        export.export_artifact(
            model,
            labels=manifest.labels,
            backbone="efficientnet_lite0",
            preprocessing=manifest.preprocessing,
            parity_batch=_batch(artifact_dir, digits_dir),
            output=output,
            name="broken",
        )
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [], "no staging directory may be left behind"


def test_parity_check_rejects_a_mismatched_torchscript(artifact_dir, digits_dir):
    artifact = load_artifact(artifact_dir)
    other = build_network("efficientnet_lite0", 4, weights="none").eval()
    with pytest.raises(export.ParityError):
        export.check_parity(other, artifact.torchscript_path, artifact.onnx_path, _batch(artifact_dir, digits_dir))


def test_digest_is_the_artifacts_identity_and_can_be_pinned(artifact_dir, tmp_path):
    original = load_artifact(artifact_dir)
    assert original.digest.startswith("sha256:") and load_artifact(artifact_dir).digest == original.digest
    assert load_artifact(artifact_dir, expected_digest=original.digest).digest == original.digest
    edited = _copy(artifact_dir, tmp_path)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["labels"][0] = "renamed"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    assert load_artifact(edited).digest != original.digest  # every file still matches its hash
    with pytest.raises(ArtifactError, match="digest"):
        load_artifact(edited, expected_digest=original.digest)


@pytest.mark.parametrize("edit", ["drop a label", "embedding size"])
def test_a_manifest_that_disagrees_with_its_network_is_refused(artifact_dir, tmp_path, edit):
    edited = _copy(artifact_dir, tmp_path)
    manifest = json.loads((edited / "manifest.json").read_text())
    if edit == "drop a label":
        manifest["labels"].pop()
    else:
        manifest["embedding_dim"] += 1
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="inconsistent"):
        Predictor.from_artifact(edited)
