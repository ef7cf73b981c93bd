"""Which files are images: the one listing rule for training data and extraction inputs.

The folder is walked iteratively with an explicit stack (no recursion: a folder nested to PATH_MAX holds a couple
of thousand levels, past Python's recursion limit), and a folder that cannot be listed (no permission, a path
longer than PATH_MAX, removed while walking) is recorded with the reason instead of being skipped silently.
Names are kept as the OS gives them (`os.fsdecode`: bytes that are not UTF-8 become surrogate escapes, so
`os.fsencode` gives the exact bytes back)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_utf8(text: str) -> bool:
    """Whether `text` (a path as the OS gave it, or a message quoting one) is valid UTF-8, i.e. has no surrogate
    escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_display(text: str) -> str:
    """`text` as valid UTF-8, the bytes of surrogate escapes shown as `\\xNN` (for messages, logs and records)."""
    return text if is_utf8(text) else os.fsencode(text).decode("utf-8", "backslashreplace")


def is_image_name(name: str) -> bool:
    """A visible file name with an image suffix (dot-files such as macOS `._x.jpg` are not images)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageListing:
    """The image files found under a folder, sorted, and the folders that could not be listed, with why."""

    files: list[str]
    """In walk order, as `str` (sorting or wrapping 100,000 paths in `Path` costs seconds; callers sort their way)."""
    unlisted: dict[str, str] = field(default_factory=dict)


def scan_image_files(folder: str | Path) -> ImageListing:
    """Every image file under `folder` (recursively; symbolic links to folders are not followed); dot-files and
    dot-folders are skipped; folders that cannot be listed are returned in `unlisted`."""
    found: list[str] = []
    unlisted: dict[str, str] = {}
    pending = [os.fspath(folder)]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        if not entry.is_symlink():
                            pending.append(entry.path)
                    elif is_image_name(entry.name):
                        found.append(entry.path)
        except OSError as exc:
            unlisted[directory] = f"folder could not be listed: {exc.strerror or exc}"
    return ImageListing(files=found, unlisted=unlisted)


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (see `scan_image_files`), sorted; folders that cannot be listed are left out."""
    return sorted(Path(path) for path in scan_image_files(folder).files)
