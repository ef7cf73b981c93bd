"""Labelled image data: discovery (image folder or CSV manifest), readability scan, splits, Dataset.

An image folder has one sub-folder per class (`DIR/<label>/*.jpg`), or split folders holding those
(`DIR/train/<label>/…`, `DIR/val/…`, `DIR/test/…`). A CSV manifest has columns `path,label` and an
optional `split` column (train/val/test); relative paths are read from the CSV's own folder.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from models.image_files import IMAGE_SUFFIXES, list_image_files
from models.decoding import ImageDecodeError, load_image
from models.preprocessing import Preprocessing, eval_geometry

SPLIT_NAMES = ("train", "val", "test")
SplitName = Literal["train", "val", "test"]


class DataError(ValueError):
    """The data source cannot be used as given; the message says what to fix."""


class ImageRecord(BaseModel):
    path: Path
    label: str
    split: SplitName | None = None


class SkippedImage(BaseModel):
    path: Path
    reason: str


class Splits(BaseModel):
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]

    def labels(self) -> list[str]:
        return sorted({r.label for r in self.train + self.val + self.test})

    def records(self) -> list[ImageRecord]:
        return [r.model_copy(update={"split": name}) for name in SPLIT_NAMES for r in getattr(self, name)]


def _class_folders(directory: Path, split: SplitName | None) -> list[ImageRecord]:
    return [
        ImageRecord(path=path, label=class_dir.name, split=split)
        for class_dir in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        for path in list_image_files(class_dir)
    ]


def read_image_folder(directory: Path) -> list[ImageRecord]:
    subdirs = {p.name for p in directory.iterdir() if p.is_dir()}
    if {"train", "val"} <= subdirs:
        return [r for split in SPLIT_NAMES if split in subdirs for r in _class_folders(directory / split, split)]
    return _class_folders(directory, None)


def read_csv_manifest(path: Path) -> list[ImageRecord]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: CSV manifest needs columns 'path,label' (missing: {', '.join(sorted(missing))})")
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                record = ImageRecord(path=row["path"], label=row["label"], split=row.get("split") or None)
            except ValidationError as exc:
                raise DataError(f"{path}, line {line}: {exc.errors()[0]['msg']}") from None
            if not record.path.is_absolute():
                record.path = path.parent / record.path
            records.append(record)
    return records


def write_csv_manifest(records: Sequence[ImageRecord], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for r in records:
            writer.writerow([str(r.path.resolve()), r.label, r.split or ""])


def discover_images(source: str | Path) -> list[ImageRecord]:
    """All labelled images of an image folder or CSV manifest."""
    source = Path(source)
    if source.is_dir():
        records = read_image_folder(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        records = read_csv_manifest(source)
    else:
        raise DataError(f"{source}: expected an image folder (one sub-folder per class) or a .csv manifest")
    if not records:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return records


def _unreadable_reason(record: ImageRecord, preprocessing: Preprocessing | None) -> str | None:
    try:
        load_image(record.path, preprocessing=preprocessing)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def scan_readable(
    records: Sequence[ImageRecord], workers: int = 4, preprocessing: Preprocessing | None = None
) -> tuple[list[ImageRecord], list[SkippedImage]]:
    """Decode every image once (as training will: `preprocessing` chooses the decode path); unreadable ones are
    returned with their reason instead of failing later."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda record: _unreadable_reason(record, preprocessing), records))
    good = [r for r, reason in zip(records, reasons) if reason is None]
    skipped = [SkippedImage(path=r.path, reason=reason) for r, reason in zip(records, reasons) if reason is not None]
    return good, skipped


AUTO_TEST_FRACTION = 0.15


def resolve_test_fraction(test_fraction: float | None, images: int) -> float:
    """`test_fraction`, or when None (automatic) 0.15 if that holds at least `AUTO_TEST_MIN_IMAGES` images, else 0."""
    from training.config import AUTO_TEST_MIN_IMAGES

    if test_fraction is not None:
        return test_fraction
    return AUTO_TEST_FRACTION if AUTO_TEST_FRACTION * images >= AUTO_TEST_MIN_IMAGES else 0.0


def split_records(
    records: Sequence[ImageRecord], val_fraction: float = 0.15, test_fraction: float | None = 0.15, seed: int = 0
) -> Splits:
    """Use the splits the data names, or make a stratified split with a fixed seed.

    - train and val named (split folders, or a CSV `split` column): used as given (test may be empty);
    - only test named: the other images are split into train/val;
    - nothing named: a stratified train/val/test split; `test_fraction` 0 makes no test split, None chooses
      (`resolve_test_fraction`): small data keeps its labels for training and says it has no test estimate.
    """
    given = {name: [r for r in records if r.split == name] for name in SPLIT_NAMES}
    if given["train"] and given["val"]:
        return Splits(**given)
    if given["val"]:
        raise DataError("data names a 'val' split but no 'train' images")
    pool = [r for r in records if r.split != "test"]
    test_fraction = 0.0 if given["test"] else resolve_test_fraction(test_fraction, len(pool))
    counts = Counter(r.label for r in pool)
    if len(counts) < 2:
        raise DataError(f"need at least 2 classes, found {len(counts)}: {sorted(counts)}")
    need = 3 if test_fraction > 0 else 2
    too_small = sorted(label for label, n in counts.items() if n < need)
    if too_small:
        parts = "train/val/test" if need == 3 else "train/val"
        raise DataError(f"classes with fewer than {need} images cannot be split into {parts}: {too_small}")
    pool = [r.model_copy(update={"split": None}) for r in pool]
    labels = [r.label for r in pool]
    if test_fraction == 0:
        val_count = min(len(pool) - len(counts), max(len(counts), math.ceil(val_fraction * len(pool))))
        train, val = train_test_split(pool, test_size=val_count, stratify=labels, random_state=seed)
        return Splits(train=train, val=val, test=given["test"])
    holdout = val_fraction + test_fraction
    train, rest = train_test_split(pool, test_size=holdout, stratify=labels, random_state=seed)
    rest_labels = [r.label for r in rest]
    stratify = rest_labels if min(Counter(rest_labels).values()) >= 2 else None
    val, test = train_test_split(rest, test_size=test_fraction / holdout, stratify=stratify, random_state=seed)
    return Splits(train=train, val=val, test=test)


def decode_to_cache(
    records: Sequence[ImageRecord], preprocessing: Preprocessing, side: int, workers: int = 2
) -> torch.Tensor:
    """Every image decoded once through the one decoding function (with the serving `preprocessing`'s decode
    path) and resized by the serving geometry to `side` x `side`: a uint8 (N, 3, side, side) tensor."""
    geometry = eval_geometry(preprocessing.with_image_size(side))

    def one(record: ImageRecord) -> np.ndarray:
        try:
            image = load_image(record.path, preprocessing=preprocessing)
        except ImageDecodeError as exc:
            raise DataError(f"{record.path} became unreadable during training: {exc}") from None
        return np.asarray(geometry(image).convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)

    out = torch.empty((len(records), 3, side, side), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, array in enumerate(pool.map(one, records)):
            out[i] = torch.from_numpy(np.ascontiguousarray(array))
    return out


class ImageDataset(Dataset):
    """Decodes one image per item in the DataLoader's worker processes, through the one decoding function with
    the run's preprocessing (so training meets the pixels the exported model will meet in serving)."""

    def __init__(
        self, records: Sequence[ImageRecord], labels: Sequence[str], transform: Callable, preprocessing: Preprocessing
    ) -> None:
        self.records = list(records)
        self.index = {label: i for i, label in enumerate(labels)}
        self.transform = transform
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        record = self.records[i]
        return self.transform(load_image(record.path, preprocessing=self.preprocessing)), self.index[record.label]

    def targets(self) -> list[int]:
        return [self.index[r.label] for r in self.records]
