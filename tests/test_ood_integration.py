"""OOD phase 2 end to end without a server: the detector fitted at training time is in the run folder and the
artifact, the Predictor scores from the same forward pass, the threshold rejects the configured share of
held-out digits, far-OOD images are flagged, a tampered OOD file is refused, old artifacts still work, and the
batch job, `evaluate --ood`, the CLI options and the service's response/metrics helpers carry it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from models.artifact import MANIFEST_FILE, ArtifactError, load_artifact
from models.decoding import load_image
from models.ood import OOD_FILE, OODDetector
from models.predictor import Predictor
from training.demo_data import write_digits_folder
from training.run_dir import RunDir

runner = CliRunner()


# --- helpers -------------------------------------------------------------------------------------------------


def strip_ood(artifact: Path, destination: Path) -> Path:
    """A copy of `artifact` as exported before phase 2: no `ood` in the manifest, no ood.npz."""
    shutil.copytree(artifact, destination)
    manifest = json.loads((destination / MANIFEST_FILE).read_text())
    manifest.pop("ood")
    manifest["files"].pop(OOD_FILE)
    (destination / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    (destination / OOD_FILE).unlink()
    return destination


def noise_images(count: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def photo_crops(per_photo: int, seed: int = 0) -> list[Image.Image]:
    """Square crops of scikit-learn's two bundled photographs (a temple, a flower)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    crops = []
    for photo in load_sample_images().images:
        for _ in range(per_photo):
            y, x = rng.integers(0, photo.shape[0] - 128), rng.integers(0, photo.shape[1] - 128)
            crops.append(Image.fromarray(photo[y : y + 128, x : x + 128]))
    return crops


PROBE_PER_CLASS = 30


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory: pytest.TempPathFactory):
    """A small model that has learned something, unlike the session's random-init tiny run (which is at chance,
    so its embeddings say nothing about what is foreign): the offline ImageNet backbone, linear probe, 32 px,
    4 digits x 30, 2 epochs (~1-2 min here); its detector is fitted by training on its validation split."""
    from conftest import tiny_config
    from training.trainer import train

    root = tmp_path_factory.mktemp("probe")
    write_digits_folder(root / "digits", classes=4, per_class=PROBE_PER_CLASS)
    config = tiny_config(root / "digits", root / "run", weights="imagenet", strategy="linear-probe", lr=1e-2)
    return train(config, show_progress=False)


@pytest.fixture(scope="module")
def fresh_digits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Every digit 0-3 of scikit-learn's set that neither the tiny run nor the probe run saw (~600 images)."""
    folder = tmp_path_factory.mktemp("fresh") / "digits"
    write_digits_folder(folder, classes=4)
    seen = tmp_path_factory.mktemp("seen")
    write_digits_folder(seen, classes=4, per_class=PROBE_PER_CLASS)  # the first N of each class: a superset of both
    names = {p.name for p in seen.rglob("*.png")}
    return [p for p in sorted(folder.rglob("*.png")) if p.name not in names]


# --- training and artifact -----------------------------------------------------------------------------------


def test_training_fits_the_detector_and_export_ships_it(trained_run):
    run = RunDir(trained_run.run_dir)
    summary = run.load_ood_summary()
    assert summary is not None and summary.method == "knn" and summary.target_rejection_rate == 0.05
    assert summary.fitted_images == len(run.load_splits().val) and run.ood_parameters.is_file()
    manifest = load_artifact(trained_run.artifact).manifest
    assert manifest.ood == summary
    assert OOD_FILE in manifest.files and (trained_run.artifact / OOD_FILE).read_bytes() == run.ood_parameters.read_bytes()
    predictor = Predictor.from_artifact(trained_run.artifact)
    assert predictor.ood is not None and predictor.ood.threshold == summary.threshold


def test_predict_batch_scores_the_same_forward_pass(artifact_dir, digits_dir):
    predictor = Predictor.from_artifact(artifact_dir)
    calls = []
    runtime = predictor.runtime

    def counting(batch):
        calls.append(len(batch))
        return runtime(batch)

    predictor.runtime = counting
    images = [load_image(p) for p in sorted(digits_dir.rglob("*.png"))[:6]] + noise_images(2)
    outputs = predictor.predict(images)
    assert calls == [8], "the OOD score must not cost a second model call"
    logits, embeddings = runtime(predictor.preprocess(images))
    np.testing.assert_allclose(outputs.ood_scores, predictor.ood.score(logits, embeddings), rtol=0, atol=1e-6)
    assert outputs.unknown.dtype == bool and (outputs.unknown == (outputs.ood_scores > predictor.ood.threshold)).all()


def test_fitted_threshold_rejects_the_configured_share_of_held_out_images(probe_run, fresh_digits, tmp_path):
    """The training-time fit (`fit_run_ood`: fp32 torch outputs of the final model) on one half of ~660 unseen
    digits, the artifact's Predictor (ONNX) on the other half: the share flagged is the target within 3 binomial
    standard errors (threshold and test sampling both counted)."""
    from models.network import build_network
    from models.preprocessing import eval_transform
    from training.data import ImageDataset, ImageRecord
    from training.ood_fit import fit_run_ood

    source = RunDir(probe_run.run_dir)
    checkpoint = source.load_checkpoint()
    config = checkpoint.config.model_copy(update={"ood_target_rejection": 0.1})
    model = build_network(config.backbone, len(checkpoint.labels), weights="none", dropout=config.dropout)
    model.load_state_dict(source.load_final_weights())
    fit_paths, test_paths = fresh_digits[0::2], fresh_digits[1::2]
    preprocessing = config.preprocessing()
    records = [ImageRecord(path=p, label=p.parent.name) for p in fit_paths]
    dataset = ImageDataset(records, checkpoint.labels, eval_transform(preprocessing), preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    run = RunDir(tmp_path / "refit")
    run.create()
    detector = fit_run_ood(config, run, model, loader, torch.device("cpu"))
    assert detector.summary.fitted_images == len(fit_paths) and detector.summary.calibration == "leave-one-out"

    predictor = Predictor.from_artifact(probe_run.artifact)
    predictor.ood = OODDetector.load(run.root, run.load_ood_summary())
    flagged = predictor.predict([load_image(p) for p in test_paths]).unknown.mean()
    target = 0.1
    error = math.sqrt(target * (1 - target) * (1 / len(fit_paths) + 1 / len(test_paths)))
    assert abs(flagged - target) <= 3 * error, f"{flagged:.3f} of held-out digits flagged for a {target} target"


def test_training_time_threshold_holds_on_held_out_digits(probe_run, fresh_digits):
    """The threshold training fitted on the probe's small validation split: its sampling error dominates."""
    predictor = Predictor.from_artifact(probe_run.artifact)
    summary = predictor.ood.summary
    flagged = predictor.predict([load_image(p) for p in fresh_digits]).unknown.mean()
    error = math.sqrt(0.05 * 0.95 * (1 / summary.fitted_images + 1 / len(fresh_digits)))
    assert abs(flagged - 0.05) <= 3 * error, f"{flagged:.3f} flagged (threshold fitted on {summary.fitted_images})"


def test_far_ood_images_are_mostly_flagged(probe_run, fresh_digits):
    predictor = Predictor.from_artifact(probe_run.artifact)
    noise = predictor.predict(noise_images(40)).unknown.mean()
    photos = predictor.predict(photo_crops(20)).unknown.mean()
    digits = predictor.predict([load_image(p) for p in fresh_digits[:200]]).unknown.mean()
    assert noise >= 0.9 and photos >= 0.8, (noise, photos)
    assert digits < 0.5 * min(noise, photos), digits


def test_a_tampered_ood_file_is_refused(artifact_dir, tmp_path):
    tampered = shutil.copytree(artifact_dir, tmp_path / "tampered")
    with np.load(tampered / OOD_FILE) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["reference"] = arrays["reference"][::-1].copy()
    np.savez(tampered / OOD_FILE, **arrays)
    with pytest.raises(ArtifactError, match="ood.npz does not match its manifest hash"):
        Predictor.from_artifact(tampered)

    unlisted = shutil.copytree(artifact_dir, tmp_path / "unlisted")
    manifest = json.loads((unlisted / MANIFEST_FILE).read_text())
    manifest["files"].pop(OOD_FILE)
    (unlisted / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no hash for the OOD file"):
        load_artifact(unlisted)

    other = shutil.copytree(artifact_dir, tmp_path / "other_dims")
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    manifest["ood"]["embedding_dim"] += 1
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="ood.npz"):
        Predictor.from_artifact(other)


def test_an_artifact_without_ood_data_still_loads_predicts_and_extracts(artifact_dir, digits_dir, tmp_path):
    import pandas as pd

    from extraction.config import ExtractionConfig
    from extraction.job import run_extraction

    old = strip_ood(artifact_dir, tmp_path / "old")
    predictor = Predictor.from_artifact(old)
    assert predictor.manifest.ood is None and predictor.ood is None
    outputs = predictor.predict([load_image(p) for p in sorted(digits_dir.rglob("*.png"))[:3]])
    assert outputs.ood_scores is None and outputs.unknown is None and outputs.probabilities.shape == (3, 4)

    summary = run_extraction(ExtractionConfig(artifact=old, input=digits_dir, output=tmp_path / "out", workers=0,
                                              show_progress=False))
    assert summary.unknown is None and summary.unknown_share is None
    assert {"ood_score", "unknown"}.isdisjoint(pd.read_parquet(tmp_path / "out").columns)


def test_extraction_writes_ood_columns_and_the_share_flagged(artifact_dir, digits_dir, tmp_path):
    import pyarrow.parquet as pq

    from extraction.config import ExtractionConfig
    from extraction.job import run_extraction

    inputs = tmp_path / "inputs"
    shutil.copytree(digits_dir, inputs / "digits")
    for i, image in enumerate(noise_images(6)):
        image.save(inputs / f"noise_{i}.png")
    summary = run_extraction(ExtractionConfig(artifact=artifact_dir, input=inputs, output=tmp_path / "out", workers=0,
                                              shard_size=32, show_progress=False))
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("ood_score").type == "float" and table.schema.field("unknown").type == "bool"
    unknown = table.column("unknown").to_numpy()
    assert summary.unknown == int(unknown.sum()) and summary.unknown_share == pytest.approx(unknown.mean(), abs=1e-6)
    rows = table.to_pandas().set_index("path")
    predictor = Predictor.from_artifact(artifact_dir)
    paths = sorted(inputs.rglob("*.png"))
    offline = predictor.predict([load_image(p) for p in paths])
    np.testing.assert_allclose(rows.loc[[str(p.resolve()) for p in paths], "ood_score"], offline.ood_scores, atol=1e-5)
    assert (rows.loc[[str(p.resolve()) for p in paths], "unknown"].to_numpy() == offline.unknown).all()


# --- evaluate --ood, CLI options -----------------------------------------------------------------------------


def test_evaluate_with_an_ood_folder_reports_separation_and_draws_histograms(probe_run, tmp_path):
    trained_run = probe_run
    foreign = tmp_path / "foreign" / "nested"
    foreign.mkdir(parents=True)
    for i, image in enumerate(noise_images(10) + photo_crops(5)):
        image.save(foreign / f"img_{i}.png")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(trained_run.artifact), "--data", str(trained_run.run_dir / "splits.csv"),
                                 "--split", "test", "--output", str(out), "--ood", str(tmp_path / "foreign")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["ood"]["ood_images"] == 20 and report["ood"]["id_images"] == trained_run.test.images
    assert report["ood"]["auroc"] >= 0.9 and report["ood"]["flagged_share_ood"] >= 0.8
    assert 0 <= report["ood_flagged_share"] <= 1 and report["ood"]["flagged_share_id"] == report["ood_flagged_share"]
    assert (out / "ood_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_ood_needs_a_detector_and_images(trained_run, tmp_path):
    old = strip_ood(trained_run.artifact, tmp_path / "old")
    folder = tmp_path / "foreign"
    folder.mkdir()
    args = ["--data", str(trained_run.run_dir / "splits.csv"), "--split", "test", "--output", str(tmp_path / "e")]
    empty = runner.invoke(app, ["evaluate", str(trained_run.artifact), *args, "--ood", str(folder)])
    assert empty.exit_code == 2 and "no image files found" in empty.output
    noise_images(1)[0].save(folder / "n.png")
    no_detector = runner.invoke(app, ["evaluate", str(old), *args, "--ood", str(folder)])
    assert no_detector.exit_code == 2 and "no out-of-distribution detector" in no_detector.output
    plain = runner.invoke(app, ["evaluate", str(old), *args])
    assert plain.exit_code == 0 and json.loads((tmp_path / "e" / "report.json").read_text())["ood"] is None


def test_train_refuses_an_unknown_ood_method_and_rate(tmp_path, digits_dir):
    for flags, problem in ((["--ood-method", "magic"], "ood_method"), (["--ood-target-rejection", "1.5"], "ood_target_rejection")):
        result = runner.invoke(app, ["train", "--data", str(digits_dir), "--output", str(tmp_path / "r"), *flags])
        assert result.exit_code == 2 and problem in result.output, result.output


def test_ood_method_none_leaves_no_detector_in_the_run(tmp_path):
    from conftest import tiny_config
    from training.ood_fit import fit_run_ood

    run = RunDir(tmp_path / "run")
    run.create()
    rng = np.random.default_rng(0)
    detector = OODDetector.fit("knn", rng.normal(size=(20, 3)), rng.normal(size=(20, 8)), np.arange(20) % 3)
    run.save_ood(detector)
    assert run.load_ood_summary() == detector.summary and run.ood_parameters.is_file()
    fit_run_ood(tiny_config(tmp_path, run.root, ood_method="none"), run, None, None, torch.device("cpu"))
    assert run.load_ood_summary() is None and not run.ood_parameters.exists()


# --- service pieces (the served answers are checked over HTTP in test_service.py) ----------------------------


def test_unknown_label_answer_and_setting():
    from models.predictor import TopK
    from service.schemas import ClassifyOptions, ClassifyResponse, ModelRef
    from service.settings import ServiceSettings
    from service.uploads import validate_options
    from service.errors import RequestError

    model = ModelRef(name="m", version="1")
    top = TopK(labels=["3", "1"], probabilities=[0.7, 0.2])
    flagged = ClassifyResponse.for_image(model, top, 0.9, True, unknown_as_label=True).predictions[0]
    assert [s.label for s in flagged.top_k] == ["unknown", "3"] and flagged.top_k[0].probability is None
    assert flagged.unknown is True and flagged.ood_score == 0.9
    kept = ClassifyResponse.for_image(model, top, 0.1, False, unknown_as_label=True).predictions[0]
    assert [s.label for s in kept.top_k] == ["3", "1"] and kept.unknown is False
    old = ClassifyResponse.for_image(model, top).predictions[0]
    assert old.ood_score is None and old.unknown is None
    assert ClassifyResponse.for_image(model, top, float("nan"), True).predictions[0].ood_score is None

    assert validate_options(ClassifyOptions, {"unknown_label": True}).unknown_label is True
    assert validate_options(ClassifyOptions, {}).unknown_label is None
    with pytest.raises(RequestError, match="unknown_label"):
        validate_options(ClassifyOptions, {"unknown_label": "yes"})
    assert ServiceSettings.from_env({"TRANSFER_SERVE_UNKNOWN_AS_LABEL": "true"}).unknown_as_label is True
    assert ServiceSettings.from_env({}).unknown_as_label is False


def test_score_histogram_buckets_have_an_edge_at_the_threshold():
    from service.ood_metrics import score_buckets

    for threshold in (0.4321, 0.0, -7.5, 123.4):
        edges = score_buckets(threshold)
        assert threshold in edges and edges == sorted(edges) and edges[-1] == math.inf and len(set(edges)) == len(edges)
