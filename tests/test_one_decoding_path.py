"""Training, evaluation, the service and the batch job meet the same pixels: one decoding function."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
from PIL import Image

from extraction.decode import ImageDecoder
from models.preprocessing import Preprocessing, eval_transform, preprocess_batch
from service.uploads import UploadLimits, decode_images
from training.data import ImageDataset, ImageRecord

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ["models", "training", "service", "extraction"]
PRE = Preprocessing(image_size=64, resize="squash", mean=(0.5,) * 3, std=(0.5,) * 3, decode="reduced")


def _phone_jpeg(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    small.resize((4032, 3024), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path.read_bytes()


def test_training_service_and_job_get_identical_network_inputs_from_a_phone_photo(tmp_path: Path):
    data = _phone_jpeg(tmp_path / "photo.jpg")
    training, _ = ImageDataset([ImageRecord(path=tmp_path / "photo.jpg", label="a")], ["a"], eval_transform(PRE), PRE)[0]
    (served,) = decode_images([("images[0]", data)], UploadLimits(max_images=1, max_pixels=40_000_000,
                                                                    max_body_bytes=10**8, preprocessing=PRE))
    job = ImageDecoder(PRE)({"index": np.array([0]), "path": np.array([str(tmp_path / "photo.jpg")], dtype=object)})
    assert job["error"][0] == ""
    service_input = preprocess_batch([served], PRE)[0]
    assert np.array_equal(training.numpy(), service_input)
    assert np.array_equal(job["pixels"][0], service_input)
    assert max(served.size) < 4032  # decoded reduced, not at full size


def test_no_product_module_but_decoding_opens_images():
    """Pillow's Image.open (and JPEG draft mode) appear only in models/decoding.py."""
    offenders = []
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "models" / "decoding.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("open", "draft") and getattr(node.value, "id", "") in ("Image", "image"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
