"""Hand-made hostile and odd images against the real server.

Hostile ones (truncated, wrong magic bytes, huge declared dimensions, decompression bombs, randomly
corrupted files) get a 4xx JSON naming the problem, never a 5xx, and the server keeps serving. Valid odd
ones (grayscale, alpha, palette transparency, 16-bit, CMYK, EXIF rotation, animated GIF, multi-page TIFF)
are served, and their answer equals that of the plain RGB image they display."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

MUTANTS = 60  # randomly corrupted copies of valid PNG/JPEG/GIF/TIFF/WEBP files


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) declaring any size, with one tiny IDAT."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def bomb_png(side: int = 3000) -> bytes:
    """A real decompression bomb: side*side pixels of zeros, a few kilobytes compressed."""
    raw = zlib.compress(b"\0" * ((side + 1) * side), 9)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")


def picture(width: int = 40, height: int = 24, seed: int = 0) -> Image.Image:
    """A non-symmetric colour picture (a rotation or a wrong frame changes the model's answer)."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 3] = (250, 20, 20)
    array[height // 2 :, width // 2 :] = (20, 20, 240)
    array += rng.integers(0, 30, size=array.shape, dtype=np.uint8)
    return Image.fromarray(array, "RGB")


JPEG = encode(picture(), "JPEG", quality=95)
PNG = encode(picture(), "PNG")

HOSTILE = {
    "truncated JPEG": (JPEG[: len(JPEG) // 2], 422, "truncated"),
    "truncated PNG": (PNG[: len(PNG) - 40], 422, "truncated"),
    "PNG cut inside the header": (PNG[:20], 422, ""),
    "wrong magic bytes": (b"\0\0\0\0" + JPEG[4:], 422, "not an image"),
    "PNG magic on JPEG data": (b"\x89PNG\r\n\x1a\n" + JPEG[8:], 422, ""),
    "PNG declaring 100000x100000": (png_declaring(100_000, 100_000), 422, "pixels"),
    "PNG declaring 20000x1": (png_declaring(20_000, 1), 422, "over the limit of 10000"),
    "decompression bomb (3000x3000 zeros)": (bomb_png(), 422, "over the limit of 10000"),
    "GIF declaring 65535x65535": (b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;", 422, ""),
    "BMP declaring 50000x50000": (
        b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 50_000, 50_000, 1, 24, 0, 0, 0, 0, 0, 0),
        422, "",
    ),
    "text named .png": (b"<?php system($_GET['c']); ?>", 422, "not an image"),
    "pickle bytes": (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.", 422, "not an image"),
}  # fmt: skip


def post_image(server, endpoint: str, data: bytes, name: str = "upload.png"):
    return server.post(endpoint, files=[("images", (name, data, "application/octet-stream"))])


def assert_client_error(response, status: int | None = None, problem: str = "") -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and problem in body["error"], body


def assert_still_serving(server) -> None:
    assert post_image(server, "/classify", PNG).status_code == 200


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_image_gets_a_4xx_naming_the_problem(reliability_server, case):
    data, status, problem = HOSTILE[case]
    for endpoint in ("/classify", "/embed"):
        assert_client_error(post_image(reliability_server, endpoint, data), status, problem)
    assert_still_serving(reliability_server)


def test_randomly_corrupted_images_never_get_a_5xx(reliability_server):
    rng = random.Random(7)
    sources = [JPEG, PNG, encode(picture(), "GIF"), encode(picture(), "TIFF"), encode(picture(), "WEBP")]
    answers = {"ok": 0, "refused": 0}
    for index in range(MUTANTS):
        data = bytearray(sources[index % len(sources)])
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if index % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        response = post_image(reliability_server, "/embed", bytes(data))
        if response.status_code == 200:
            answers["ok"] += 1
        else:
            assert_client_error(response, 422)
            answers["refused"] += 1
    print(f"\n{MUTANTS} corrupted images: {answers}")
    assert_still_serving(reliability_server)


# --- valid odd images: served, and equal to the RGB image they display -----------------------------------


def embedding(server, data: bytes) -> np.ndarray:
    response = post_image(server, "/embed", data)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"][0], dtype=np.float32)


def assert_same_answer(server, odd: bytes, displayed: Image.Image) -> np.ndarray:
    served = embedding(server, odd)
    np.testing.assert_allclose(served, embedding(server, encode(displayed.convert("RGB"), "PNG")), atol=1e-4)
    return served


def test_grayscale_is_served_as_its_gray_rgb(reliability_server):
    gray = picture().convert("L")
    assert_same_answer(reliability_server, encode(gray, "PNG"), Image.merge("RGB", [gray] * 3))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(reliability_server, mode):
    image = picture().convert(mode)
    alpha = Image.linear_gradient("L").resize(image.size)
    image.putalpha(alpha)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    assert_same_answer(reliability_server, encode(image, "PNG"), Image.alpha_composite(white, image.convert("RGBA")))


def test_palette_transparency_is_composited_on_white(reliability_server):
    image = picture().convert("P")
    image.info["transparency"] = 0
    data = encode(image, "PNG", transparency=0)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    assert_same_answer(reliability_server, data, Image.alpha_composite(white, Image.open(io.BytesIO(data)).convert("RGBA")))


def test_sixteen_bit_png_is_scaled_to_eight_bits(reliability_server):
    gray = np.asarray(picture().convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray(gray * 257)  # 0..65535, same brightness as the 8-bit gray
    assert sixteen.mode.startswith("I;16")
    assert_same_answer(reliability_server, encode(sixteen, "PNG"), Image.fromarray(gray.astype(np.uint8)))


def test_cmyk_jpeg_is_converted(reliability_server):
    data = encode(picture().convert("CMYK"), "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "CMYK"
    assert_same_answer(reliability_server, data, decoded.convert("RGB"))


def test_exif_rotation_is_applied(reliability_server):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = encode(picture(), "JPEG", quality=95, exif=exif.tobytes())
    upright = Image.open(io.BytesIO(JPEG)).transpose(Image.Transpose.ROTATE_270)  # the same pixels, turned by hand
    assert upright.size == (24, 40)
    served = assert_same_answer(reliability_server, rotated, upright)
    assert not np.allclose(served, embedding(reliability_server, JPEG), atol=1e-3)  # the rotation matters


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_images_use_their_first_frame(reliability_server, fmt):
    first, second = picture(seed=1), picture(seed=2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    data = encode(first, fmt, save_all=True, append_images=[second], **({"duration": 100} if fmt == "GIF" else {}))
    opened = Image.open(io.BytesIO(data))
    assert getattr(opened, "n_frames", 1) == 2
    opened.seek(0)
    served = assert_same_answer(reliability_server, data, opened.convert("RGB"))
    opened.seek(1)
    assert not np.allclose(served, embedding(reliability_server, encode(opened.convert("RGB"), "PNG")), atol=1e-3)
