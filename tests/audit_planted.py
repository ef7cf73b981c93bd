"""Planted problems for the audit tests and benchmarks/audit.py: a copy of labelled data as a CSV manifest
with labels flipped, images copied into another split and under another label, and one truncated file."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data import ImageRecord, discover_images, split_records, write_csv_manifest


@dataclass
class Planted:
    manifest: Path
    flipped: list[Path] = field(default_factory=list)
    split_copies: list[tuple[Path, Path]] = field(default_factory=list)  # (original, copy in another split)
    label_copies: list[tuple[Path, Path]] = field(default_factory=list)  # (original, copy under another label)
    truncated: Path | None = None


def plant_problems(data: Path, work: Path, flips: int = 10, split_copies: int = 5, label_copies: int = 3,
                   seed: int = 0) -> Planted:
    """Write `work/manifest.csv` for `data` (its own splits, or the stratified split `train` makes) with the
    problems planted; copies and the truncated file are new files under `work/planted/`."""
    records = discover_images(data)
    records = records if any(r.split for r in records) else split_records(records, test_fraction=0.15, seed=seed).records()
    labels = sorted({r.label for r in records})
    rng = np.random.default_rng(seed)
    plain = [i for i, r in enumerate(records) if r.path.suffix.lower() in (".png", ".jpg", ".jpeg")]
    chosen = rng.choice(plain, flips + split_copies + label_copies + 1, replace=False)
    copies = work / "planted"
    copies.mkdir(parents=True, exist_ok=True)
    planted = Planted(manifest=work / "manifest.csv")
    out = list(records)
    for i in chosen[:flips]:
        other = [label for label in labels if label != records[i].label]
        out[i] = records[i].model_copy(update={"label": str(rng.choice(other))})
        planted.flipped.append(records[i].path)
    for n, i in enumerate(chosen[flips : flips + split_copies]):
        original = records[i]
        target = copies / f"split-copy-{n}{original.path.suffix}"
        shutil.copyfile(original.path, target)
        other_split = "test" if original.split != "test" else "train"
        out.append(ImageRecord(path=target, label=original.label, split=other_split))
        planted.split_copies.append((original.path, target))
    for n, i in enumerate(chosen[flips + split_copies : flips + split_copies + label_copies]):
        original = records[i]
        target = copies / f"label-copy-{n}{original.path.suffix}"
        shutil.copyfile(original.path, target)
        other = [label for label in labels if label != original.label]
        out.append(ImageRecord(path=target, label=str(rng.choice(other)), split=original.split))
        planted.label_copies.append((original.path, target))
    source = records[chosen[-1]]
    truncated = copies / f"truncated{source.path.suffix}"
    data_bytes = source.path.read_bytes()
    truncated.write_bytes(data_bytes[: max(16, len(data_bytes) // 2)])
    out.append(ImageRecord(path=truncated, label=source.label, split=source.split))
    planted.truncated = truncated
    write_csv_manifest(out, planted.manifest)
    return planted
