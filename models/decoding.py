"""Image decoding: bytes or a file -> one RGB PIL image, at bounded cost, or `ImageDecodeError` saying why.

The one decoding function (`load_image`) that training, export's parity check, evaluation, the HTTP
service and the batch job all call, so a model meets the same pixels in production as in training.

What an input may cost is checked from its header before any pixel is decoded: the declared pixel count,
and the bytes the decoded image will occupy (by mode: a 16-bit or RGBA image costs more per pixel than
an 8-bit grey one). A file is read only when it is a regular file of bounded size (never a FIFO, device
or socket), and a sniff of an unknown file reads a few header bytes, never the whole file.

With a `Preprocessing` whose `decode` is ``"reduced"`` (every artifact trained since 2026-11-27), large
images are decoded straight to a reduced size: JPEG through libjpeg's DCT scaling (Pillow's draft
mode), every format through an integer box reduction right after decoding, so the full-size pixels are
dropped at once. The reduced image keeps its shorter side at least twice the side the network's resize
step needs (`reduced_min_side`), and the usual antialiased resize does the rest. ``"full"`` (older
artifacts) decodes every pixel, as those models were trained.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.preprocessing import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000
"""Images above this many pixels are refused before decoding (decompression-bomb guard)."""

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
"""Image files larger than this are refused before reading."""

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})

EXIF_ORIENTATION = 0x0112

SNIFF_BYTES = 32
"""Header bytes read to describe a file Pillow cannot identify."""

BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "BGR;16": 2}
"""Bytes Pillow's image memory holds per pixel, by mode; every mode not listed takes 4 (RGB is stored as
RGBX, and I, F, RGBA, CMYK, LA, YCbCr are 32-bit)."""

FULL_STORAGE_BYTES_PER_PIXEL = 4


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message names the reason."""


def decoded_bytes(mode: str, size: tuple[int, int]) -> int:
    """Bytes Pillow allocates for an image of this mode and size."""
    return size[0] * size[1] * BYTES_PER_PIXEL.get(mode, FULL_STORAGE_BYTES_PER_PIXEL)


def reduced_min_side(p: Preprocessing) -> int:
    """Shortest side a reduced decode keeps: twice what the network's resize step needs."""
    return 2 * math.ceil(p.image_size / p.crop_pct)


def read_image_file(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; FIFOs, devices, sockets and folders are refused
    without blocking or reading (opened non-blocking, checked with fstat before any read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"not a regular file (a folder): {path}") from None
    except OSError as exc:
        with contextlib.suppress(OSError):  # a socket cannot be opened at all (ENXIO): say what it is
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise ImageDecodeError(f"not a regular file ({_file_kind(mode)}): {path}") from None
        raise ImageDecodeError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"not a regular file ({_file_kind(info.st_mode)}): {path}")
        if info.st_size > max_bytes:
            raise ImageDecodeError(f"file is {info.st_size} bytes, over the limit of {max_bytes}: {path}")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while being read
        raise ImageDecodeError(f"file is over the limit of {max_bytes} bytes: {path}")
    return data


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def load_image(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    preprocessing: Preprocessing | None = None,
    max_decoded_bytes: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Image.Image:
    """Decode bytes or a file into an RGB PIL image, or raise ImageDecodeError saying why.

    Checked from the header before decoding: the format, `max_pixels` (declared width x height) and
    `max_decoded_bytes` (what the decoded image will occupy, after any JPEG draft reduction; default
    4 bytes x `max_pixels`). With `preprocessing.decode == "reduced"` the image comes back reduced (see the
    module docstring). EXIF orientation is applied, grayscale/16-bit/CMYK/palette images are converted,
    and transparency is composited onto white. Multi-frame images use their first frame.
    """
    data = source if isinstance(source, bytes) else read_image_file(source, max_file_bytes)
    limit = FULL_STORAGE_BYTES_PER_PIXEL * max_pixels if max_decoded_bytes is None else max_decoded_bytes
    min_side = _reduced_side(preprocessing)
    with _decode_errors(data), _opened(data, max_pixels, min_side) as image:
        cost = decoded_bytes(image.mode, image.size)
        if cost > limit:
            raise ImageDecodeError(
                f"image would take {cost} bytes decoded ({image.width}x{image.height} {image.mode}), "
                f"over the limit of {limit}"
            )
        image.seek(0)
        image.load()
        decoded = _box_reduce(image, min_side) if min_side is not None else image
        return _to_rgb(_upright(decoded))


def decode_cost(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, preprocessing: Preprocessing | None = None) -> int:
    """Bytes `load_image` will allocate to decode `data` (after any JPEG draft reduction), read from the header
    alone; raises ImageDecodeError for what `load_image` would refuse from the header."""
    with _decode_errors(data), _opened(data, max_pixels, _reduced_side(preprocessing)) as image:
        return decoded_bytes(image.mode, image.size)


def _reduced_side(preprocessing: Preprocessing | None) -> int | None:
    if preprocessing is None or preprocessing.decode != "reduced":
        return None
    return reduced_min_side(preprocessing)


@contextlib.contextmanager
def _opened(data: bytes, max_pixels: int, min_side: int | None) -> Iterator[Image.Image]:
    """The image with its header checked and, for a reduced JPEG decode, libjpeg's DCT scaling configured."""
    if not data:
        raise ImageDecodeError("empty file: zero bytes received")
    with Image.open(io.BytesIO(data)) as image:
        _check_header(image, max_pixels)
        if min_side is not None and image.format in ("JPEG", "MPO"):
            image.draft(image.mode if image.mode in ("RGB", "L", "CMYK") else "RGB", (min_side, min_side))
        yield image


@contextlib.contextmanager
def _decode_errors(data: bytes) -> Iterator[None]:
    """Every way Pillow fails on bad data, as one ImageDecodeError naming the reason."""
    try:
        yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        declared = _declared_size(data[:SNIFF_BYTES])
        if declared is not None and 0 in declared:
            raise ImageDecodeError(f"zero-size image ({declared[0]}x{declared[1]})") from None
        raise ImageDecodeError("not an image: the bytes match no supported image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:  # truncated or corrupt data
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def _check_header(image: Image.Image, max_pixels: int) -> None:
    if image.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format!r}")
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageDecodeError(f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an image without one is returned as it is (exif_transpose would copy it:
    20-25 ms for a 12 MP photo)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _box_reduce(image: Image.Image, min_side: int) -> Image.Image:
    """Shrink by the largest integer factor that keeps the shorter side >= min_side (box filter, like DCT
    scaling); the full-size pixels are released when the caller drops `image`."""
    factor = min(image.size) // min_side
    if factor < 2:
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)  # to 8-bit grey (1 byte a pixel), not RGB (4): same pixels once reduced
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F", "CMYK", "YCbCr"):
        image = _to_rgb(image)  # palette and 1-bit modes cannot be box-reduced as they are
    return image.reduce(factor)


def _declared_size(header: bytes) -> tuple[int, int] | None:
    """Width and height a PNG or GIF header declares; Pillow refuses to identify 0-pixel images at all."""
    if header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR" and len(header) >= 24:
        return struct.unpack(">II", header[16:24])
    if header[:6] in (b"GIF87a", b"GIF89a") and len(header) >= 10:
        return struct.unpack("<HH", header[6:10])
    return None


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in (*SIXTEEN_BIT_MODES, "I"):
        image = _sixteen_bit_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit grey: the top 8 of 16 bits when any value exceeds 255, else kept. In place on
    one integer copy (no float64 copy, which cost 8 bytes a pixel)."""
    array = np.array(image)
    if array.size and array.max() > 255:
        np.clip(array, 0, 65535, out=array)
        array >>= 8
    else:
        np.clip(array, 0, 255, out=array)
    return Image.fromarray(array.astype(np.uint8), mode="L")
