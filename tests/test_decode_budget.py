"""Issue 21, items 1, 2, 4 and 7 (decoding): what one image may cost in memory and CPU, counted and bounded
for every shape, mode and format the service accepts, with GENERATED inputs (made here, small and fast)."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from models.decode_limits import MAX_JPEG_SCANS, MAX_TIFF_BLOCKS, tiff_block_count
from models.decoding import (
    ImageDecodeError,
    MAX_KEPT_ASPECT,
    load_image,
    open_image,
    reduced_min_side,
    storage_bytes,
)
from models.preprocessing import Preprocessing, normalized_chw

SQUASH = Preprocessing(image_size=224, resize="squash", mean=(0.5,) * 3, std=(0.5,) * 3, decode="reduced")
CROP = Preprocessing(image_size=224, resize="shorter_side_crop", crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3,
                     decode="reduced")  # fmt: skip


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _pattern(size: tuple[int, int]) -> np.ndarray:
    """A cheap non-flat 8-bit pattern (stripes and a gradient)."""
    x = np.arange(size[0], dtype=np.uint16)[None, :]
    y = np.arange(size[1], dtype=np.uint16)[:, None]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def _generated(kind: str, size: tuple[int, int]) -> bytes:
    """One image of each class the service accepts, at `size`."""
    grey = Image.fromarray(_pattern(size), "L")
    if kind == "1-bit PNG":
        return _encode(grey.convert("1"), "PNG")
    if kind == "L PNG":
        return _encode(grey, "PNG")
    if kind == "P PNG":
        return _encode(grey.convert("RGB").quantize(16), "PNG")
    if kind == "P+transparency GIF":
        return _encode(grey.quantize(16), "GIF", transparency=0)
    if kind == "RGBA PNG":
        return _encode(Image.merge("RGBA", [grey, grey, grey, grey]), "PNG")
    if kind == "16-bit PNG":
        return _encode(Image.fromarray(_pattern(size).astype(np.uint16) * 200), "PNG")
    if kind == "16-bit TIFF":
        return _encode(Image.fromarray(_pattern(size).astype(np.uint16) * 200), "TIFF", compression="tiff_deflate")
    if kind == "JPEG":
        return _encode(grey.convert("RGB"), "JPEG", quality=70)
    if kind == "progressive JPEG":
        return _encode(grey.convert("RGB"), "JPEG", quality=70, progressive=True)
    if kind == "WebP":
        return _encode(grey.convert("RGB"), "WEBP", quality=50)
    raise ValueError(kind)


KINDS = ["1-bit PNG", "L PNG", "P PNG", "P+transparency GIF", "RGBA PNG", "16-bit PNG", "16-bit TIFF", "JPEG",
         "progressive JPEG", "WebP"]  # fmt: skip
WIDE, TALL = (16_000, 300), (300, 16_000)


# --- item 1: memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [WIDE, TALL], ids=["wide", "tall"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preprocessing", [SQUASH, CROP], ids=["squash", "crop"])
def test_a_reduced_decode_keeps_a_bounded_image_along_both_sides(kind: str, size, preprocessing) -> None:
    """A very wide or tall image (its short side under what the reduction needs) no longer stays full size: the
    kept image is at most MAX_KEPT_ASPECT:1 of twice the network's resize side, whatever the format and mode."""
    image = load_image(_generated(kind, size), preprocessing=preprocessing)
    side = reduced_min_side(preprocessing)
    assert image.mode == "RGB"
    assert max(image.size) <= 2 * MAX_KEPT_ASPECT * side, image.size
    assert (image.width >= image.height) == (size[0] >= size[1])  # still wide (or tall)


@pytest.mark.parametrize("kind", KINDS)
def test_the_plan_counts_what_the_decode_holds_not_the_file_mode(kind: str) -> None:
    """The budget charges at least the decoded pixels plus, at full size, the RGB copy they are converted to
    (main charged a 1-bit, grey or palette image one byte a pixel, then converted it to 4)."""
    size = (600, 400)
    with open_image(_generated(kind, size)) as opened:
        plan = opened.plan
        assert plan.peak_bytes >= storage_bytes(opened.image.mode, size) + (
            storage_bytes("RGB", size) if opened.image.mode != "RGB" else 0
        )
    if kind in ("P+transparency GIF", "RGBA PNG"):  # + the alpha channel (and the RGBA copy of a palette)
        assert plan.peak_bytes >= storage_bytes("RGB", size) + storage_bytes("L", size) + size[0] * size[1]


def test_a_tight_byte_budget_refuses_a_one_bit_image_by_its_rgb_conversion() -> None:
    data = _generated("1-bit PNG", (1000, 1000))
    with pytest.raises(ImageDecodeError, match="bytes decoded"):
        load_image(data, max_decoded_bytes=2 * 1000 * 1000)  # 1 byte decoded + 4 of RGB a pixel
    assert load_image(data, max_decoded_bytes=5 * 1000 * 1000).size == (1000, 1000)


def test_banded_conversion_equals_converting_the_whole_image() -> None:
    """Palette and 16-bit images are converted and reduced a band at a time: same pixels as in one piece."""
    rng = np.random.default_rng(1)
    palette = Image.fromarray(rng.integers(0, 255, (1800, 1400, 3), dtype=np.uint8)).quantize(64)
    data = _encode(palette, "PNG")
    banded = load_image(data, preprocessing=SQUASH)
    factor = 1400 // reduced_min_side(SQUASH)
    whole = palette.convert("RGB").reduce(factor)
    assert banded.size == whole.size and np.array_equal(np.asarray(banded), np.asarray(whole))


def test_transparency_is_composited_on_white_after_reduction() -> None:
    rgba = Image.new("RGBA", (3000, 2000), (10, 20, 30, 0))
    image = load_image(_encode(rgba, "PNG"), preprocessing=SQUASH)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_normalized_chw_takes_only_rgb() -> None:
    """Conversion is decoding's, done once there (issue 21, item 7)."""
    with pytest.raises(ValueError, match="RGB"):
        normalized_chw(Image.new("L", (4, 4)), SQUASH)


# --- item 2: CPU ---------------------------------------------------------------------------------------------


def _many_scan_jpeg(scans: int) -> bytes:
    """A small progressive JPEG whose last scan is repeated: libjpeg decodes every repeat (warning only)."""
    data = _generated("progressive JPEG", (256, 256))
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    with pytest.raises(ImageDecodeError, match=f"scans, over the limit of {MAX_JPEG_SCANS}"):
        load_image(_many_scan_jpeg(3 * MAX_JPEG_SCANS))
    assert load_image(_many_scan_jpeg(20)).size == (256, 256)  # a normal progressive JPEG has ~10


def multi_strip_tiff(width: int, height: int, rows_per_strip: int = 1) -> bytes:
    """An uncompressed 8-bit grey TIFF with one strip every `rows_per_strip` rows (Pillow's writer makes few)."""
    strips = -(-height // rows_per_strip)
    pixels = _pattern((width, height)).tobytes()
    entries = 9
    ifd_size = 2 + 12 * entries + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    strip_bytes = width * rows_per_strip
    offsets = [data_at + i * strip_bytes for i in range(strips)]
    counts = [min(strip_bytes, len(pixels) - i * strip_bytes) for i in range(strips)]
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, strips, offsets_at), (277, 3, 1, 1), (278, 4, 1, rows_per_strip), (279, 4, strips, counts_at)]
    ifd = struct.pack("<H", entries) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack(f"<{strips}I", *offsets)
            + struct.pack(f"<{strips}I", *counts) + pixels)  # fmt: skip


def test_a_tiff_with_too_many_strips_is_refused_before_pillow_builds_its_tiles() -> None:
    data = multi_strip_tiff(2, 2 * MAX_TIFF_BLOCKS)  # one row a strip
    assert tiff_block_count(data) == 2 * MAX_TIFF_BLOCKS
    with pytest.raises(ImageDecodeError, match="strips or tiles"):
        load_image(data)


def test_tiff_block_count_reads_big_endian_and_bigtiff_headers() -> None:
    entry = struct.pack(">HHII", 273, 4, 70_000, 0)
    classic = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry
    assert tiff_block_count(classic) == 70_000
    big_entry = struct.pack("<HHQQ", 324, 16, 90_000, 0)
    bigtiff = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 1) + big_entry
    assert tiff_block_count(bigtiff) == 90_000
    assert tiff_block_count(b"II*\x00\xff\xff\xff\xff") == 0  # unreadable: Pillow refuses it itself


def test_normal_multi_strip_tiffs_and_progressive_photos_are_not_refused() -> None:
    rgb = Image.fromarray(np.stack([_pattern((4000, 3000))] * 3, axis=-1))
    tiff = multi_strip_tiff(4000, 3000, rows_per_strip=1)  # 3,000 strips: the most a normal writer makes
    assert tiff_block_count(tiff) == 3000
    assert load_image(tiff, preprocessing=SQUASH).size == (667, 500)  # box factor 3000 // 448 = 6
    phone = _encode(rgb.resize((4032, 3024)), "JPEG", quality=85, progressive=True, exif=Image.Exif().tobytes())
    assert load_image(phone, preprocessing=SQUASH).size == (1008, 756)


def _png_with_private_chunks(count: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    private = chunk(b"prVt", b"")
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)) + private * count
            + chunk(b"IDAT", zlib.compress(b"\x00" * 72)) + chunk(b"IEND", b""))  # fmt: skip


def test_cpu_spent_parsing_is_bounded_where_the_work_runs() -> None:
    """A PNG of 300,000 private chunks (Pillow reads each in Python): stopped once over the CPU budget."""
    with pytest.raises(ImageDecodeError, match="s of CPU to decode.*max_decode_cpu_s"):
        load_image(_png_with_private_chunks(300_000), max_cpu_s=0.2)
    assert load_image(_png_with_private_chunks(10), max_cpu_s=0.2).size == (8, 8)


def test_a_cancelled_decode_stops() -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(ImageDecodeError, match="timed out or its client went away"):
        load_image(_generated("L PNG", (100, 100)), cancelled=cancelled)


@pytest.mark.parametrize("fmt", ["PPM", "EPS", "PCX", "TGA"])
def test_unsupported_formats_are_not_parsed(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Image.open(formats=...)`: a PPM or EPS is refused without its plugin ever parsing it."""
    from PIL import Image as PILImage

    PILImage.init()
    opened = []
    factory, accept = PILImage.OPEN[fmt]
    monkeypatch.setitem(PILImage.OPEN, fmt, (lambda *a, **k: opened.append(fmt) or factory(*a, **k), accept))
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n" + b" " * 1000 if fmt == "EPS" else _encode(Image.new("RGB", (8, 8)), fmt)
    with pytest.raises(ImageDecodeError, match="unsupported image format"):
        load_image(data)
    assert opened == []


def test_the_full_size_pixels_are_freed_as_soon_as_the_reduced_image_exists() -> None:
    """The service opens every image of a request first (one header parse each): each decoded source must go
    when its reduced image is made, not when the request's last image is done (14 16-bit PNGs held 1 GB)."""
    with open_image(_generated("16-bit PNG", (3000, 2000)), preprocessing=SQUASH) as opened:
        reduced = opened.decode()
        with pytest.raises(ValueError, match="closed"):
            opened.image.getpixel((0, 0))
    assert reduced.mode == "RGB" and reduced.size == (750, 500)
