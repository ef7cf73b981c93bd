"""Image decoding: bytes or a file -> one RGB PIL image, at bounded cost, or `ImageDecodeError` saying why.

The one decoding function (`load_image`) that training, export's parity check, evaluation, the HTTP
service and the batch job all call, so a model meets the same pixels in production as in training.

What an input may cost is checked from its header before any pixel is decoded (`open_image`, which parses
each header once): the declared pixel count, and what the decode will hold at once (`DecodePlan.peak_bytes`:
the pixels as decoded, by mode, the decoder's own buffers, and every copy the crop, reduction and RGB
conversion make; not the file's mode alone). Its CPU is bounded where the work runs (models/decode_limits.py).
A file is read only when it is a regular file of bounded size (never a FIFO, device or socket), and a sniff
of an unknown file reads a few header bytes, never the whole file.

With a `Preprocessing` whose `decode` is ``"reduced"`` (every artifact trained since 2026-11-27), large
images are decoded straight to a reduced size: JPEG through libjpeg's DCT scaling (Pillow's draft
mode), every format through an integer box reduction right after decoding, so the full-size pixels are
dropped at once. The reduced image keeps its shorter side at least twice the side the network's resize
step needs (`reduced_min_side`), and its longer side at most `MAX_KEPT_ASPECT` times that (see `DecodePlan`),
and the usual antialiased resize does the rest. ``"full"`` (older artifacts) decodes every pixel, as those
models were trained. Conversion to RGB happens here, once; `normalized_chw` takes RGB.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.decode_limits import (
    DECODER_READ_BYTES,
    DEFAULT_MAX_DECODE_CPU_S,
    CpuBudget,
    DecodeLimitError,
    MeteredStream,
    check_structure,
)
from models.preprocessing import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000
"""Images above this many pixels are refused before decoding (decompression-bomb guard)."""

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
"""Image files larger than this are refused before reading."""

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
OPEN_FORMATS = tuple(sorted(SUPPORTED_FORMATS - {"MPO"}))
"""The plugins `Image.open` may try (JPEG's opens MPO files too): a file of another format is refused before
its plugin parses it (a 30 MB PPM of whitespace took 37 s to refuse)."""

EXIF_ORIENTATION = 0x0112

SNIFF_BYTES = 32
"""Header bytes read to describe a file Pillow cannot identify."""

BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "BGR;16": 2}
"""Bytes Pillow's image memory holds per pixel, by mode; every mode not listed takes 4 (RGB is stored as
RGBX, and I, F, RGBA, CMYK, LA, YCbCr are 32-bit)."""

FULL_STORAGE_BYTES_PER_PIXEL = 4
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

MAX_KEPT_ASPECT = 2
"""A reduced decode keeps at most this long a side per unit of short side (see `DecodePlan`)."""

DECODE_BYTES_PER_PIXEL = 6
"""Default per-image limit on what a decode holds at once, per declared pixel allowed (240 MB at 40 MP): room
for a 40 MP RGBA PNG or a 12 MP progressive phone JPEG, not for a 40 MP 4:4:4 progressive JPEG (400 MB)."""

BAND_PIXELS = 1 << 18
"""Pixels converted at a time when a mode Pillow cannot reduce (1-bit, palette, 16-bit) is reduced."""


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message names the reason."""


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


@dataclass(frozen=True)
class DecodePlan:
    """What decoding one image will do and allocate, decided from its header alone (before any pixel).

    `crop` (a box of the stored image, or None) and `factors` (box reduction along x and y) make a reduced
    decode keep no more than the network's resize step needs along BOTH sides: a very wide or tall image is
    cropped to its central `MAX_KEPT_ASPECT`:1 (the network's centre crop sees less) or, for a squashing
    resize, reduced more along its long side. `peak_bytes` is the most the decode holds at once: the pixels
    as Pillow decodes them (with what the decoder itself keeps: a progressive JPEG's coefficients, WebP's
    canvas), the cropped or converted copy, the reduced image and its conversion to RGB."""

    mode: str
    size: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    factors: tuple[int, int]
    peak_bytes: int


def storage_bytes(mode: str, size: tuple[int, int]) -> int:
    """Bytes Pillow's image memory holds for an image of this mode and size."""
    return size[0] * size[1] * BYTES_PER_PIXEL.get(mode, FULL_STORAGE_BYTES_PER_PIXEL)


def reduced_min_side(p: Preprocessing) -> int:
    """Shortest side a reduced decode keeps: twice what the network's resize step needs."""
    return 2 * math.ceil(p.image_size / p.crop_pct)


def plan_decode(image: Image.Image, preprocessing: Preprocessing | None, decoder_bytes: int = 0) -> DecodePlan:
    """The plan for an opened (header read, JPEG draft set) image; `decoder_bytes`: what its decoder keeps
    besides the image (`_decoder_bytes`, read before the draft). See `DecodePlan`."""
    mode = image.mode
    crop, factors = None, (1, 1)
    if preprocessing is not None and preprocessing.decode == "reduced":
        crop, factors = _reduction(image.size, preprocessing)
    region = (crop[2] - crop[0], crop[3] - crop[1]) if crop else image.size
    reduced = (-(-region[0] // factors[0]), -(-region[1] // factors[1]))
    has_alpha = mode in ALPHA_MODES or (mode == "P" and _palette_has_alpha(image))
    decoder = storage_bytes(mode, image.size) + decoder_bytes
    if factors == (1, 1):
        copy = storage_bytes(mode, region) if crop else 0
        work = copy + _conversion_peak(mode, region, has_alpha)
    else:
        working = _working_mode(mode, has_alpha)
        band = min(region[1], max(factors[1], BAND_PIXELS // max(region[0], 1)))
        band_bytes = storage_bytes(mode, (region[0], band)) + storage_bytes(working, (region[0], band))
        banded = 0 if working == mode else 2 * band_bytes  # a band's crop and conversion, and its reduction
        work = banded + storage_bytes(working, reduced) + _conversion_peak(working, reduced, has_alpha)
    return DecodePlan(mode=mode, size=image.size, crop=crop, factors=factors, peak_bytes=decoder + work)


def _reduction(size: tuple[int, int], p: Preprocessing) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
    """Crop box and box-reduction factors of a reduced decode (x first)."""
    min_side = reduced_min_side(p)
    short, long = min(size), max(size)
    short_factor = short // min_side if short // min_side >= 2 else 1
    crop = None
    long_factor = short_factor
    if p.resize == "shorter_side_crop":
        kept = min(long, MAX_KEPT_ASPECT * short)
        if kept < long:
            start = (long - kept) // 2
            crop = (start, 0, start + kept, short) if size[0] >= size[1] else (0, start, short, start + kept)
    else:  # squash: every pixel reaches the network, so the long side is reduced more instead
        long_factor = max(short_factor, long // (MAX_KEPT_ASPECT * min_side))
    factors = (long_factor, short_factor) if size[0] >= size[1] else (short_factor, long_factor)
    return crop, factors


def _decoder_bytes(image: Image.Image) -> int:
    """What the decoder keeps besides the image: a progressive JPEG's DCT coefficients (2 bytes each, for every
    block of every component, whatever the draft scale); for WebP, libwebp's two RGBA canvases and the frame
    Pillow copies out of them (so a WebP costs 16 bytes a pixel: the default per-image limit admits 15 MP)."""
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        width, height = image.size
        layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
        h_max = max(h for _, h, _, _ in layers) or 1
        v_max = max(v for _, _, v, _ in layers) or 1
        return sum(2 * width * height * h * v // (h_max * v_max) for _, h, v, _ in layers)
    if image.format == "WEBP":  # libwebp's animation decoder (Pillow's only path): two canvases, then a bytes copy
        return 3 * 4 * image.size[0] * image.size[1]
    return 0


def _palette_has_alpha(image: Image.Image) -> bool:
    return "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")


def _working_mode(mode: str, has_alpha: bool) -> str:
    """The mode an image is box-reduced in: its own when Pillow can reduce it, else 8-bit grey or RGB(A)."""
    if mode in SIXTEEN_BIT_MODES or mode == "1":
        return "L"
    if mode in ("P", "PA"):  # palette indices cannot be averaged
        return "RGBA" if has_alpha else "RGB"
    return mode


def _conversion_peak(mode: str, size: tuple[int, int], has_alpha: bool) -> int:
    """Bytes `_to_rgb` allocates at most (besides its input) for an image of this mode and size."""
    if mode == "RGB":
        return 0
    rgb = storage_bytes("RGB", size)
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return storage_bytes("L", size) + rgb  # banded to 8-bit grey, then RGB
    if has_alpha:
        rgba = 0 if mode == "RGBA" else storage_bytes("RGBA", size)
        return rgba + storage_bytes("L", size) + rgb  # RGBA copy, its alpha channel, the white background
    return rgb


def load_image(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    preprocessing: Preprocessing | None = None,
    max_decoded_bytes: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_cpu_s: float = DEFAULT_MAX_DECODE_CPU_S,
    cancelled: threading.Event | None = None,
) -> Image.Image:
    """Decode bytes or a file into an RGB PIL image, or raise ImageDecodeError saying why.

    Checked from the header before decoding: the format, `max_pixels` (declared width x height) and
    `max_decoded_bytes` (the decode's `DecodePlan.peak_bytes`; default 4 bytes x `max_pixels`); throughout,
    the CPU it may take (`max_cpu_s`, models/decode_limits.py) and `cancelled`. With
    `preprocessing.decode == "reduced"` the image comes back reduced (see the module docstring). EXIF
    orientation is applied, grayscale/16-bit/CMYK/palette images are converted, and transparency is
    composited onto white. Multi-frame images use their first frame.
    """
    data = source if isinstance(source, bytes) else read_image_file(source, max_file_bytes)
    with open_image(data, max_pixels, preprocessing=preprocessing, max_cpu_s=max_cpu_s, cancelled=cancelled) as opened:
        opened.check_bytes(default_decode_bytes(max_pixels) if max_decoded_bytes is None else max_decoded_bytes)
        return opened.decode()


def default_decode_bytes(max_pixels: int) -> int:
    """The per-image limit on `DecodePlan.peak_bytes` when none is given: `DECODE_BYTES_PER_PIXEL` a pixel."""
    return DECODE_BYTES_PER_PIXEL * max_pixels


@dataclass
class OpenedImage:
    """An image whose header has been read and checked, with its plan: `decode()` turns it into RGB pixels.
    The header is parsed once, whether the caller first sums the plans of many images (the service's
    per-request budget) or decodes at once."""

    image: Image.Image
    plan: DecodePlan
    budget: CpuBudget

    def decode(self) -> Image.Image:
        with _decode_errors(), self.budget.running():
            self.image.seek(0)
            self.image.load()
            self.budget.check()
            reduced = _reduce(self.image, self.plan, self.budget)
            self.budget.check()
            rgb = _to_rgb(_upright(reduced))
        if rgb is not self.image:
            self.image.close()  # the full-size pixels go now, not when the caller's last opened image does
        if getattr(self.image, "_decoder", None) is not None:  # Pillow's WebP decoder keeps its two canvases
            self.image._decoder = None  # type: ignore[attr-defined]  until the image object goes
        return rgb

    def check_bytes(self, limit: int) -> None:
        """Refuse the decode when its plan holds more than `limit` bytes at once."""
        if self.plan.peak_bytes > limit:
            raise ImageDecodeError(
                f"image would take {self.plan.peak_bytes} bytes decoded ({self.image.width}x{self.image.height} "
                f"{self.image.mode}), over the limit of {limit}"
            )


@contextlib.contextmanager
def open_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    preprocessing: Preprocessing | None = None,
    max_cpu_s: float = DEFAULT_MAX_DECODE_CPU_S,
    cancelled: threading.Event | None = None,
) -> Iterator[OpenedImage]:
    """The image with its structure and header checked (format, pixel count, JPEG scans, TIFF strips), JPEG
    DCT scaling configured for a reduced decode, and its plan; ImageDecodeError for what is refused."""
    if not data:
        raise ImageDecodeError("empty file: zero bytes received")
    budget = CpuBudget(max_cpu_s, cancelled)
    with _decode_errors(data):
        check_structure(data)
        with budget.running():
            image = Image.open(MeteredStream(data, budget), formats=OPEN_FORMATS)
        with image:
            _check_header(image, max_pixels)
            image.decodermaxblock = DECODER_READ_BYTES
            decoder = _decoder_bytes(image)  # before DCT scaling: a progressive JPEG keeps every coefficient
            min_side = _reduced_side(preprocessing)
            if min_side is not None and image.format in ("JPEG", "MPO"):
                image.draft(image.mode if image.mode in ("RGB", "L", "CMYK") else "RGB", (min_side, min_side))
            yield OpenedImage(image=image, plan=plan_decode(image, preprocessing, decoder), budget=budget)


def _reduced_side(preprocessing: Preprocessing | None) -> int | None:
    if preprocessing is None or preprocessing.decode != "reduced":
        return None
    return reduced_min_side(preprocessing)


@contextlib.contextmanager
def _decode_errors(data: bytes = b"") -> Iterator[None]:
    """Every way Pillow fails on bad data, as one ImageDecodeError naming the reason."""
    try:
        yield
    except ImageDecodeError:
        raise
    except DecodeLimitError as exc:
        raise ImageDecodeError(str(exc)) from None
    except UnidentifiedImageError:
        declared = _declared_size(data[:SNIFF_BYTES])
        if declared is not None and 0 in declared:
            raise ImageDecodeError(f"zero-size image ({declared[0]}x{declared[1]})") from None
        other = _unsupported_format(data[:SNIFF_BYTES])
        if other is not None:
            raise ImageDecodeError(f"unsupported image format {other!r}") from None
        raise ImageDecodeError(
            f"not an image, or an unsupported image format: the bytes match none of {', '.join(OPEN_FORMATS)}"
        ) from None
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


def _reduce(image: Image.Image, plan: DecodePlan, budget: CpuBudget) -> Image.Image:
    """The plan's crop and box reduction (like DCT scaling). A mode Pillow cannot reduce (1-bit, palette,
    16-bit) is converted and reduced a band of rows at a time, so no full-size converted copy exists; the
    band height is a multiple of the vertical factor, so the result equals reducing the whole image."""
    if plan.factors == (1, 1):
        return image.crop(plan.crop) if plan.crop else image
    box = plan.crop or (0, 0, *image.size)
    working = _working_mode(image.mode, image.mode == "PA" or (image.mode == "P" and _palette_has_alpha(image)))
    if working == image.mode:
        return image.reduce(plan.factors, box=box)
    convert = _band_converter(image, working)
    fx, fy = plan.factors
    left, top, right, bottom = box
    rows = max(fy, (BAND_PIXELS // max(right - left, 1)) // fy * fy)
    out = Image.new(working, (-(-(right - left) // fx), -(-(bottom - top) // fy)))
    for y in range(top, bottom, rows):
        budget.check()
        band = convert(image.crop((left, y, right, min(y + rows, bottom))))
        out.paste(band.reduce(plan.factors), (0, (y - top) // fy))
    return out


def _band_converter(image: Image.Image, working: str) -> Callable[[Image.Image], Image.Image]:
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        shift = 8 if (image.getextrema()[1] or 0) > 255 else 0  # the whole image's range decides, as unbanded
        return lambda band: _sixteen_bit_to_l(band, shift)
    return lambda band: band.convert(working)


def _unsupported_format(header: bytes) -> str | None:
    """The format another Pillow plugin recognises from these header bytes alone (its `accept` check, a
    prefix comparison: nothing is parsed), to name it in the refusal."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name not in SUPPORTED_FORMATS and accept is not None:
            with contextlib.suppress(Exception):
                if accept(header) is True:
                    return name
    return None


def _declared_size(header: bytes) -> tuple[int, int] | None:
    """Width and height a PNG or GIF header declares; Pillow refuses to identify 0-pixel images at all."""
    if header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR" and len(header) >= 24:
        return struct.unpack(">II", header[16:24])
    if header[:6] in (b"GIF87a", b"GIF89a") and len(header) >= 10:
        return struct.unpack("<HH", header[6:10])
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparency composited onto white (pasting through the alpha channel, which gives the same
    values as `Image.alpha_composite` onto opaque white without its two extra RGBA copies)."""
    if image.mode in (*SIXTEEN_BIT_MODES, "I"):
        image = _sixteen_bit_to_l(image, 8 if (image.getextrema()[1] or 0) > 255 else 0)
    if image.mode in ALPHA_MODES or (image.mode == "P" and _palette_has_alpha(image)):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image, shift: int) -> Image.Image:
    """16/32-bit grey -> 8-bit grey: the top 8 of 16 bits (`shift` 8, when any value of the image exceeds 255),
    else the values clipped to 0-255. In place on one integer copy (no float64 copy, 8 bytes a pixel)."""
    array = np.array(image)
    np.clip(array, 0, 65535 if shift else 255, out=array)
    if shift:
        array >>= shift
    return Image.fromarray(array.astype(np.uint8), mode="L")
