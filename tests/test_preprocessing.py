import io

import numpy as np
import pytest
from PIL import Image

from models.decoding import ImageDecodeError, load_image

from models.preprocessing import Preprocessing, preprocess_batch


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


PRE = Preprocessing(image_size=32, resize="squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_batch_shape_and_normalisation():
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    batch = preprocess_batch([white, white], PRE)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    assert np.allclose(batch, 1.0)


def test_center_crop_mode_keeps_size():
    pre = Preprocessing(image_size=32, resize="shorter_side_crop", crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1))
    assert preprocess_batch([Image.new("RGB", (100, 60))], pre).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
def test_odd_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = load_image(_encode(Image.new(mode, (10, 8)), fmt))
    assert image.mode == "RGB" and image.size == (10, 8)


def test_transparency_composited_on_white():
    image = load_image(_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0))))
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    image = load_image(_encode(Image.fromarray(array)))
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_applied():
    source = Image.new("RGB", (20, 10))
    exif = source.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    image = load_image(_encode(source, "JPEG", exif=exif))
    assert image.size == (10, 20)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty"),
        (b"definitely not an image", "not an image"),
        (_encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "truncated"),
    ],
)
def test_bad_bytes_raise_named_errors(payload, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        load_image(payload)


def test_zero_size_image_named_as_such():
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (0).to_bytes(4, "big") + (10).to_bytes(4, "big")
    with pytest.raises(ImageDecodeError, match="zero-size image"):
        load_image(header + b"\x08\x02\x00\x00\x00rest")


def test_pixel_limit_checked_before_decoding():
    with pytest.raises(ImageDecodeError, match="over the limit"):
        load_image(_encode(Image.new("L", (300, 300))), max_pixels=10_000)


def test_unsupported_format_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")
    with pytest.raises(ImageDecodeError, match="unsupported image format"):
        load_image(buffer.getvalue())


# --- the preprocessing an artifact records is the one it serves --------------------------------------------------

OLD_LITE0_SQUASH = {"image_size": 32, "resize": "squash", "crop_pct": 1.0, "interpolation": "bilinear",
                    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "decode": "reduced"}
"""efficientnet_lite0's preprocessing as artifacts exported before 2026-12-04 record it (at a 32 px test size)."""
RED = (255, 0, 0)


def _red_edged_wide_image() -> Image.Image:
    """96x48: red 16-px bands at the left and right edges, blue between. A squash keeps the bands; the weights'
    resize-shorter-side + centre crop cuts them off."""
    image = Image.new("RGB", (96, 48), (0, 0, 255))
    for left in (0, 80):
        image.paste(Image.new("RGB", (16, 48), RED), (left, 0))
    return image


def _copy_with_preprocessing(artifact, preprocessing: dict, output):
    import json
    import shutil

    from models.artifact import read_manifest, write_manifest

    shutil.copytree(artifact, output)
    manifest = json.loads(read_manifest(output).model_dump_json())
    manifest["preprocessing"] = preprocessing
    write_manifest(output, type(read_manifest(output)).model_validate(manifest))
    return output


@pytest.fixture(scope="module")
def lite0_artifact(artifact_dir):
    """The session's tiny efficientnet_lite0 run, trained and exported with today's defaults (conftest.TINY)."""
    return artifact_dir


def _red_share(batch: np.ndarray, pre: Preprocessing) -> float:
    """Share of the batch's pixels that are the red of the bands (after undoing the normalisation)."""
    pixels = batch[0] * np.asarray(pre.std, dtype=np.float32)[:, None, None] + np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    return float(((pixels[0] > 0.9) & (pixels[2] < 0.1)).mean())


def test_new_lite0_artifact_records_and_serves_the_weights_resize_and_crop(lite0_artifact):
    """Training takes the weights' own preprocessing (timm's pretrained config) and the artifact serves it: the
    centre crop cuts the red bands off."""
    from models.predictor import Predictor

    predictor = Predictor.from_artifact(lite0_artifact)
    recorded = predictor.manifest.preprocessing
    assert (recorded.resize, recorded.crop_pct, recorded.interpolation) == ("shorter_side_crop", 0.875, "bicubic")
    assert _red_share(predictor.preprocess([_red_edged_wide_image()]), recorded) == 0.0


def test_old_squash_manifest_still_loads_and_serves_squashed_pixels(lite0_artifact, tmp_path):
    """A manifest written before the lite0 default changed (no field it lacks) loads, and the service path
    (`Predictor.predict`, what /classify and /embed call) sees stretched pixels: both red bands, a third of the
    width, as when it was trained."""
    from models.predictor import Predictor

    old = Predictor.from_artifact(_copy_with_preprocessing(lite0_artifact, OLD_LITE0_SQUASH, tmp_path / "old"))
    new = Predictor.from_artifact(lite0_artifact)
    assert old.manifest.preprocessing == Preprocessing.model_validate(OLD_LITE0_SQUASH)
    image = _red_edged_wide_image()
    squashed = old.preprocess([image])
    assert _red_share(squashed, old.manifest.preprocessing) == pytest.approx(1 / 3, abs=0.03)
    served_old, served_new = old.predict([image]).embeddings, new.predict([image]).embeddings
    np.testing.assert_allclose(served_old, old.predict_batch(squashed).embeddings, rtol=0, atol=1e-6)
    assert not np.allclose(served_old, served_new, atol=1e-4), "the two manifests must serve different pixels"


@pytest.mark.parametrize("source, bands_kept", [("old squash manifest", True), ("lite0 default", False)])
def test_training_cache_holds_the_serving_geometry(tmp_path, source, bands_kept):
    """Training's image cache (which its random resized crops sample from) is made by the run's preprocessing at
    the cache side: with lite0's default (the weights' crop) it holds only the centre region serving will see."""
    from training.config import TrainConfig
    from training.data import ImageRecord, decode_to_cache

    path = tmp_path / "wide.png"
    _red_edged_wide_image().save(path)
    if source == "lite0 default":
        pre = TrainConfig(data=tmp_path, output=tmp_path / "run", image_size=32).preprocessing()
    else:
        pre = Preprocessing.model_validate(OLD_LITE0_SQUASH)
    cached = decode_to_cache([ImageRecord(path=path, label="x")], pre, side=37, workers=1)[0].numpy()
    red = (cached[0] > 230) & (cached[2] < 25)
    assert red.any() == bands_kept


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_and_centre_crop_match_torchvision_two_steps(interpolation):
    """The one-resampling resize + centre crop gives torchvision's `Resize` + `CenterCrop` pixels for every
    orientation, up- and downscales, odd sizes and the registry's crop fractions: within 2 grey levels on
    photo-like content (Pillow itself runs its two passes in either order; on white noise the orders differ by up
    to ~20 levels, so the images here are smooth noise, as photos are) and identical in size and crop anchor."""
    from torchvision.transforms import v2 as T

    from models.preprocessing import eval_geometry, interpolation_mode

    rng = np.random.default_rng(0)
    shapes = [(320, 240), (240, 320), (333, 500), (256, 256), (1000, 200), (200, 1000), (37, 53), (8, 8), (2016, 1512)]
    for size, crop_pct in [(224, 0.875), (240, 0.882), (260, 0.89), (128, 0.875), (224, 1.0), (32, 0.95)]:
        pre = Preprocessing(image_size=size, resize="shorter_side_crop", crop_pct=crop_pct,
                            interpolation=interpolation, mean=(0.5,) * 3, std=(0.5,) * 3)
        two_steps = T.Compose([T.Resize(int(round(size / crop_pct)), interpolation=interpolation_mode(pre)),
                               T.CenterCrop(size)])
        for width, height in shapes:
            coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8))
            image = coarse.resize((width, height), Image.Resampling.BILINEAR)
            expected = np.asarray(two_steps(image), dtype=np.int16)
            got = np.asarray(eval_geometry(pre)(image), dtype=np.int16)
            assert got.shape == expected.shape == (size, size, 3)
            assert np.abs(got - expected).max() <= 2, (width, height, size, crop_pct)
