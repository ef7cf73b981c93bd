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
