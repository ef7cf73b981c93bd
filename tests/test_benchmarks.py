"""The benchmarks keep running (each `--quick` mode, shrunk further, so CI notices when one rots), and the
fast inference paths they measure give the same top-1 class as fp32 eager PyTorch on real photographs."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_benchmark_quick():
    rows = load("runtime").main(["--quick", "--batch-sizes", "2", "--image-size", "32", "--min-iters", "1",
                                 "--runtimes", "eager-fp32", "eager-bf16-cl", "torchscript", "onnx"])
    assert [row[1] for row in rows] == ["eager-fp32", "eager-bf16-cl", "torchscript", "onnx"]
    assert all(float(row[3]) > 0 for row in rows), rows


def test_training_benchmark_quick():
    steps, epochs = load("training_speed").main(["--quick", "--weights", "none", "--steps", "1", "--per-class", "6"])
    assert [row[0] for row in steps] == ["fp32 eager NCHW", "fp32 channels_last"]
    assert len(epochs) == 1 and float(epochs[0][1]) > 0


def test_quality_benchmark_quick(tmp_path):
    rows = load("quality").main(["--quick", "--protocols", "P3", "--recipes", "probe", "new", "--seeds", "0",
                                 "--out", str(tmp_path / "q.jsonl")])
    assert [(row[0], row[1]) for row in rows] == [("P3", "probe"), ("P3", "new")]
    assert all(0.0 <= float(row[3]) <= 1.0 and row[5] == 40 for row in rows), rows
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 2


def test_quality_probe_only_compares_preprocessings_on_cached_embeddings(tmp_path):
    """--probe-only runs only the frozen-feature probe; each image is embedded once per preprocessing, and two
    samplings draw different training images."""
    rows = load("quality").main(["--quick", "--probe-only", "--protocols", "P3", "--resize", "native", "squash",
                                 "--seeds", "0", "1", "--scratch", str(tmp_path)])
    assert [row[1] for row in rows] == ["probe", "probe-squash"]
    assert "shorter_side_crop 32px bicubic" in rows[0][-1] and "squash 32px bilinear" in rows[1][-1]
    assert len(list((tmp_path / "embeddings").glob("*.npz"))) == 2
    for row in rows:  # "mean ± sd%" of the two samplings' accuracies
        accuracies = [float(a) for a in row[3].split()]
        assert len(accuracies) == 2
        assert row[2] == f"{100 * np.mean(accuracies):.2f} ± {100 * np.std(accuracies, ddof=1):.2f}%"
    assert (tmp_path / "P3-0.csv").read_text() != (tmp_path / "P3-1.csv").read_text()


def test_extraction_benchmark_quick():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "extraction_speed.py"), "--images", "8", "--workers", "0",
                             "--batch-size", "4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| local | 0 | 4 | 8 |" in result.stdout


def test_preprocessing_benchmark_quick():
    rows = load("preprocessing_speed").main(["--quick"])
    assert len(rows) == 6 and all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert all(row[5] <= 2 for row in rows), "the product's resize must give torchvision's pixels"


def test_12mp_photos_and_decode_copies(tmp_path: Path):
    """The 12 MP generator makes camera-sized JPEGs, and an artifact copied with another `decode` loads with it
    (a new digest: the manifest changed; the files it lists still verify)."""
    from PIL import Image

    from models.artifact import load_artifact
    from models.decoding import load_image

    common = load("common")
    payload = common.photo_12mp_payloads(1)[0]
    assert Image.open(io.BytesIO(payload)).size == (4032, 3024) and len(payload) > 1_000_000
    source = load("common").export_model(tmp_path / "export", "resnet18", "none", num_classes=2, image_size=32)
    full = load_artifact(common.with_decode(source, "full", tmp_path / "full"))
    reduced = load_artifact(common.with_decode(source, "reduced", tmp_path / "reduced"))
    assert (full.manifest.preprocessing.decode, reduced.manifest.preprocessing.decode) == ("full", "reduced")
    assert full.digest != reduced.digest
    assert load_image(payload, preprocessing=full.manifest.preprocessing).size == (4032, 3024)
    assert max(load_image(payload, preprocessing=reduced.manifest.preprocessing).size) < 4032


@pytest.mark.slow
def test_extraction_benchmark_12mp_quick(artifact_dir: Path):
    rows = load("extraction_speed").main(["--photos-12mp", "--quick", "--workers", "0", "--artifact", str(artifact_dir)])
    assert [(row[0], row[4]) for row in rows] == [("full (before)", 2), ("reduced (after)", 2)]


@pytest.mark.slow
def test_service_benchmark_12mp_quick(artifact_dir: Path):
    rows = load("serving").main(["--photos-12mp", "--quick", "--artifact", str(artifact_dir), "--photos", "1",
                                 "--clients", "2", "--requests", "2", "--batch-sizes", "4", "--reference-batch", "2"])
    assert [(row[0], row[2], row[-1]) for row in rows] == [("full (before)", 2, 0), ("reduced (after)", 2, 0)]


@pytest.mark.slow
def test_service_benchmark_quick(artifact_dir: Path):
    rows = load("serving").main(["--quick", "--artifact", str(artifact_dir), "--clients", "2", "--requests", "4",
                                 "--images-per-request", "1", "--batch-sizes", "4", "1", "--reference-batch", "2"])
    assert [(row[0], row[3], row[-1]) for row in rows] == [("on (max batch 4)", 4, 0), ("off (max batch 1)", 4, 0)]


def test_run_gpu_script_names_every_benchmark():
    script = (BENCHMARKS / "run_gpu.sh").read_text()
    for name in ("runtime.py", "serving.py", "training_speed.py", "extraction_speed.py"):
        assert name in script


@pytest.fixture(scope="module")
def photos():
    """Real photographs (scikit-image's bundled samples) as RGB PIL images."""
    from PIL import Image
    from skimage import data

    arrays = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.camera()]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


@pytest.fixture(scope="module")
def prototype_artifact(photos, tmp_path_factory):
    """efficientnet_lite0 with its ImageNet weights and a head whose class c is photo c's own fp32 embedding
    (scaled unit vector): every photo's right answer is its own class, by a real-feature margin."""
    from models.network import build_network
    from models.preprocessing import preprocess_batch
    from models.registry import get_spec
    from training.export import export_artifact

    spec = get_spec("efficientnet_lite0")
    torch.manual_seed(0)
    model = build_network(spec.name, num_classes=len(photos), weights="imagenet").eval()
    batch = torch.from_numpy(preprocess_batch(photos, spec.preprocessing))
    with torch.no_grad():
        _, embeddings = model(batch)
        linear = model.head[1]
        linear.weight.copy_(10 * embeddings / embeddings.norm(dim=1, keepdim=True))
        linear.bias.zero_()
    output = tmp_path_factory.mktemp("prototype") / "artifact"
    export_artifact(model, labels=[f"photo_{i}" for i in range(len(photos))], backbone=spec.name,
                    preprocessing=spec.preprocessing, parity_batch=batch[:2], output=output, name="photos",
                    version="test")
    return model, batch, output


def test_fast_paths_agree_with_fp32_eager_top1(prototype_artifact):
    from models.artifact import load_artifact
    from models.runtimes import OnnxRuntime, TorchScriptRuntime

    model, batch, output = prototype_artifact
    with torch.inference_mode():
        expected = model(batch)[0].argmax(1).numpy()
        channels_last = model.to(memory_format=torch.channels_last)(batch.contiguous(memory_format=torch.channels_last))
        bf16 = model.to(torch.bfloat16)(batch.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    model.float().to(memory_format=torch.contiguous_format)
    assert list(expected) == list(range(len(expected)))  # the photos are told apart at all
    artifact = load_artifact(output)
    answers = {
        "eager channels_last fp32": channels_last[0].argmax(1).numpy(),
        "eager channels_last bf16": bf16[0].float().argmax(1).numpy(),
        "onnx": OnnxRuntime(artifact)(batch.numpy())[0].argmax(1),
        "torchscript fp32 (frozen)": TorchScriptRuntime(artifact)(batch.numpy())[0].argmax(1),
        "torchscript bf16": TorchScriptRuntime(artifact, precision="bf16")(batch.numpy())[0].argmax(1),
    }
    for name, top1 in answers.items():
        np.testing.assert_array_equal(top1, expected, err_msg=name)
