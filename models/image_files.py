"""Which files are images: the one listing rule for training data and extraction inputs."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """A visible file name with an image suffix (dot-files such as macOS `._x.jpg` are not images)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively), sorted; dot-files and dot-folders are skipped."""
    folder = Path(folder)
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files if is_image_name(name))
    return sorted(found)
