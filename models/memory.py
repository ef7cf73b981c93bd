"""Giving decoding memory back to the OS (glibc's allocator), for the server's workers and the job's decoders.

Decoding a large image allocates tens to hundreds of megabytes for a moment. glibc keeps freed memory by
default: its mmap threshold rises to the largest block freed so far (up to 32 MiB), so the next big
buffers come from the heap and stay mapped after they are freed, and every thread that decodes may get
an arena of its own (up to 8 per core). A server that decoded a few hostile requests then holds gigabytes
it no longer uses. Three measures, each a no-op where glibc is absent (macOS, musl):

- `configure_allocator()` at process start: a fixed mmap threshold (`MMAP_THRESHOLD`, so a big buffer is
  its own mapping, unmapped when freed) and at most `ARENA_MAX` arenas;
- `release_memory()` after work that allocated much (`malloc_trim(0)`: free pages of every arena back to
  the OS), called by `trim_after(cost)` when a request decoded more than `TRIM_AFTER_BYTES`;
- `MALLOC_ARENA_MAX` in the environment of processes started for serving (`ALLOCATOR_ENV`), read by glibc
  before any Python code runs.

Pillow's block cache stays off (`Image.core.set_blocks_max(0)`, its default unless PILLOW_BLOCKS_MAX is set).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading

logger = logging.getLogger(__name__)

MB = 1024 * 1024
MMAP_THRESHOLD = 1 * MB
"""Allocations at least this big are mmap'd, and unmapped when freed (glibc's dynamic threshold is off)."""
ARENA_MAX = 2
TRIM_AFTER_BYTES = 64 * MB
"""A request (or batch) that decoded more than this is followed by `malloc_trim(0)`."""
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": str(ARENA_MAX)}
"""Environment for processes started to serve: glibc reads it at process start."""

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_M_ARENA_MAX = -8
_trimming = threading.Lock()


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (or not loadable)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD, arena_max: int = ARENA_MAX) -> bool:
    """Make this process give big freed buffers back at once; True when glibc took the settings. Idempotent."""
    try:
        from PIL import Image

        Image.core.set_blocks_max(0)
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - an old or odd Pillow
        pass
    libc = _glibc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) & bool(libc.mallopt(_M_ARENA_MAX, arena_max))
    if not applied:  # pragma: no cover - glibc refuses only out-of-range values
        logger.warning("glibc refused mallopt(M_MMAP_THRESHOLD=%d, M_ARENA_MAX=%d)", mmap_threshold, arena_max)
    return applied


def release_memory() -> bool:
    """`malloc_trim(0)`: return the free pages of every arena to the OS. Skipped (False) without glibc, or while
    another thread is trimming (one trim at a time is enough)."""
    libc = _glibc()
    if libc is None or not _trimming.acquire(blocking=False):
        return False
    try:
        libc.malloc_trim(0)
        return True
    finally:
        _trimming.release()


def trim_after(decoded_bytes: int) -> bool:
    """`release_memory()` when `decoded_bytes` (what the work just decoded) is over `TRIM_AFTER_BYTES`."""
    return decoded_bytes > TRIM_AFTER_BYTES and release_memory()
