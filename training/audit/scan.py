"""Every file read once: its sha256 (for exact duplicates) and whether the one decoding function takes it
(with the reason when it does not: what `train` would skip)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from models.decoding import ImageDecodeError, load_image, read_image_file
from models.image_files import is_image_name
from models.preprocessing import Preprocessing
from training.data import ImageRecord


@dataclass(frozen=True)
class ScannedFile:
    record: ImageRecord
    sha256: str | None  # None: the file could not be read at all
    reason: str | None  # None: decoded


def _scan_one(record: ImageRecord, preprocessing: Preprocessing | None) -> ScannedFile:
    try:
        data = read_image_file(record.path)
    except ImageDecodeError as exc:
        return ScannedFile(record, None, str(exc))
    digest = hashlib.sha256(data).hexdigest()
    try:
        load_image(data, preprocessing=preprocessing)
    except ImageDecodeError as exc:
        return ScannedFile(record, digest, str(exc))
    return ScannedFile(record, digest, None)


def scan_files(
    records: Sequence[ImageRecord], preprocessing: Preprocessing | None = None, workers: int = 2
) -> list[ScannedFile]:
    """Hash and decode every record's file (in `workers` threads; decoding releases the GIL), in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda record: _scan_one(record, preprocessing), records))


def ignored_files(data: Path) -> list[Path]:
    """Visible files under an image folder that have no image suffix (discovery skips them silently)."""
    if not data.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(data):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files if not name.startswith(".") and not is_image_name(name))
    return sorted(found)
