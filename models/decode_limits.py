"""What one image may cost in CPU to decode, checked where the work runs.

Pixel and byte counts (models/decoding.py) bound what a decode allocates; they do not bound its CPU. A few
hundred kilobytes can cost minutes: a progressive JPEG repeating thousands of scans over a large image (each
scan walks every block), a TIFF declaring millions of strips (Pillow builds one tile per strip, in Python,
inside `Image.open`), a PNG of a million private chunks, a BMP whose RLE data Pillow decodes in Python. So:

- two structural limits read from the raw bytes before Pillow parses anything (`check_structure`): at most
  `MAX_JPEG_SCANS` scans in a JPEG (libjpeg-turbo's `max_scans` idea; a normal progressive JPEG has ~10) and
  at most `MAX_TIFF_BLOCKS` strips or tiles in a TIFF's first directory (Pillow's writer makes a few
  thousand at most for a 40 MP image);
- a CPU budget for everything else (`CpuBudget`): Pillow reads its input through `MeteredStream`, which checks
  the decoding thread's CPU time (not wall time: a loaded machine does not refuse images) and a cancellation
  event before every read, and decoders are fed `DECODER_READ_BYTES` at a time, so a decode stops within one
  small chunk of work once it is over budget or its request is gone.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
from typing import Iterator

DEFAULT_MAX_DECODE_CPU_S = 2.0
"""CPU seconds one image may take to decode (header, pixels and conversion). A 12 MP phone JPEG takes ~0.1 s
on the reference machine, an 8000x5000 RGB PNG ~1 s."""

MAX_JPEG_SCANS = 64
"""Scans (SOS markers, an EXIF thumbnail's included) a JPEG may hold; each costs a pass over every block."""

MAX_TIFF_BLOCKS = 16_384
"""Strips or tiles a TIFF's first directory may declare."""

DECODER_READ_BYTES = 16 * 1024
"""Input fed to a decoder between two budget checks (Pillow's default is 64 KiB)."""

STRIP_OFFSETS, TILE_OFFSETS = 273, 324


class DecodeLimitError(ValueError):
    """An image is over one of the limits above; the message names the limit. (Not an OSError or SyntaxError,
    so Pillow passes it through instead of trying another plugin or calling the file truncated.)"""


class DecodeCancelled(DecodeLimitError):
    """The request this decode serves has timed out or its client has gone."""


class CpuBudget:
    """CPU seconds one image's decode may spend, counted only while it runs (`running()`: its header is read
    in one step and its pixels in another, other images' work in between), and the event that cancels it."""

    def __init__(self, limit_s: float = DEFAULT_MAX_DECODE_CPU_S, cancelled: threading.Event | None = None) -> None:
        self.limit_s = limit_s
        self.cancelled = cancelled
        self.spent = 0.0
        self._since: float | None = None

    def spent_s(self) -> float:
        return self.spent + (0.0 if self._since is None else time.thread_time() - self._since)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._since = time.thread_time()
        try:
            yield
        finally:
            self.spent, self._since = self.spent_s(), None

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise DecodeCancelled("decoding stopped: the request timed out or its client went away")
        if self.spent_s() > self.limit_s:
            raise DecodeLimitError(
                f"image took over {self.limit_s:g} s of CPU to decode, over the limit of {self.limit_s:g} s "
                "(max_decode_cpu_s)"
            )


class MeteredStream(io.BytesIO):
    """The image bytes as Pillow reads them, checking `budget` before every read and seek."""

    def __init__(self, data: bytes, budget: CpuBudget) -> None:
        super().__init__(data)
        self.budget = budget

    def read(self, size: int | None = -1) -> bytes:
        self.budget.check()
        return super().read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.budget.check()
        return super().seek(offset, whence)


def check_structure(data: bytes) -> None:
    """Refuse, from the raw bytes alone, a JPEG with too many scans or a TIFF with too many strips or tiles."""
    if data[:2] == b"\xff\xd8":
        scans = data.count(b"\xff\xda")  # 0xFF in entropy-coded data is always stuffed (FF00) or a marker
        if scans > MAX_JPEG_SCANS:
            raise DecodeLimitError(f"JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS} (MAX_JPEG_SCANS)")
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        blocks = tiff_block_count(data)
        if blocks > MAX_TIFF_BLOCKS:
            raise DecodeLimitError(
                f"TIFF declares {blocks} strips or tiles, over the limit of {MAX_TIFF_BLOCKS} (MAX_TIFF_BLOCKS)"
            )


def tiff_block_count(data: bytes) -> int:
    """The most strip or tile offsets the first directory of a TIFF (classic or BigTIFF) declares; 0 when the
    directory cannot be read (Pillow then refuses the file itself)."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        if data[2:4] in (b"*\x00", b"\x00*"):  # classic: 2-byte entry count, 12-byte entries
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, offset)
            entry, start = struct.Struct(order + "HHI4x"), offset + 2
        else:  # BigTIFF: 8-byte entry count, 20-byte entries
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, offset)
            entry, start = struct.Struct(order + "HHQ8x"), offset + 8
        table = data[start : start + count * entry.size]
        return max(
            (n for tag, _, n in entry.iter_unpack(table[: len(table) - len(table) % entry.size])
             if tag in (STRIP_OFFSETS, TILE_OFFSETS)),
            default=0,
        )
    except struct.error:
        return 0
