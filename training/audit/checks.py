"""The cheap checks `train` runs before it trains (`TrainConfig.audit`, `--no-audit` skips them): unreadable
files and byte-identical images in two splits, one warning line each, pointing at `transfer-serve audit`
for near duplicates, label errors and outliers (which need embeddings)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from tqdm.auto import tqdm

from models.decoding import ImageDecodeError, read_image_file
from training.audit.duplicates import exact_groups
from training.audit.schema import AuditedImage, DuplicateGroup
from training.data import SkippedImage, Splits


def _sha256(path) -> str:
    try:
        return hashlib.sha256(read_image_file(path)).hexdigest()
    except ImageDecodeError:
        return f"unreadable:{path}"  # vanished since the scan: never equal to another file


def duplicates_across_splits(splits: Splits, workers: int = 2) -> list[DuplicateGroup]:
    """Groups of byte-identical files that sit in two splits."""
    images = [AuditedImage(path=r.path, label=r.label, split=r.split) for r in splits.records()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashes = list(pool.map(_sha256, [i.path for i in images]))
    return [g for g in exact_groups(images, hashes) if g.across_splits]


def warn_before_training(splits: Splits, skipped: Sequence[SkippedImage], warn: Callable[[str], None] = tqdm.write) -> None:
    """One line per kind of problem found; nothing when there is none."""
    if skipped:
        warn(f"audit: {len(skipped)} unreadable files skipped (listed in skipped.json)")
    groups = duplicates_across_splits(splits)
    if groups:
        example = groups[0].images
        warn(f"audit: {len(groups)} images appear byte-identical in two splits (e.g. {example[0].path} in "
             f"{example[0].split} and {example[1].path} in {example[1].split}): the held-out estimate is optimistic")
    if skipped or groups:
        warn("audit: `transfer-serve audit DATA` also finds near duplicates, likely label errors and outliers")
