"""Labelled image data: discovery (image folder or CSV manifest), readability scan, splits, Dataset.

An image folder has one sub-folder per class (`DIR/<label>/*.jpg`), or split folders holding those
(`DIR/train/<label>/…`, `DIR/val/…`, `DIR/test/…`). A CSV manifest has columns `path,label` and an
optional `split` column (train/val/test); relative paths are read from the CSV's own folder.
"""

from __future__ import annotations

import csv
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ValidationError
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from models.image_files import IMAGE_SUFFIXES, list_image_files
from models.decoding import ImageDecodeError, load_image
from models.preprocessing import Preprocessing

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


def split_records(
    records: Sequence[ImageRecord], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> Splits:
    """Use the splits the data names, or make a stratified train/val/test split with a fixed seed."""
    if any(r.split for r in records):
        given = {name: [r for r in records if r.split == name] for name in SPLIT_NAMES}
        if not given["train"] or not given["val"]:
            raise DataError("data names its splits but has no 'train' or no 'val' images")
        return Splits(**given)
    counts = Counter(r.label for r in records)
    if len(counts) < 2:
        raise DataError(f"need at least 2 classes, found {len(counts)}: {sorted(counts)}")
    too_small = sorted(label for label, n in counts.items() if n < 3)
    if too_small:
        raise DataError(f"classes with fewer than 3 images cannot be split into train/val/test: {too_small}")
    labels = [r.label for r in records]
    holdout = val_fraction + test_fraction
    train, rest = train_test_split(list(records), test_size=holdout, stratify=labels, random_state=seed)
    rest_labels = [r.label for r in rest]
    stratify = rest_labels if min(Counter(rest_labels).values()) >= 2 else None
    val, test = train_test_split(rest, test_size=test_fraction / holdout, stratify=stratify, random_state=seed)
    return Splits(train=train, val=val, test=test)


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
