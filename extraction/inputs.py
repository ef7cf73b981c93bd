"""The job's inputs: an image folder (recursive) or a .csv / .parquet manifest with a `path` column, as
absolute paths, sorted and de-duplicated (the order shards are cut in).

Paths are `str` as the OS gives them: a name that is not UTF-8 holds surrogate escapes (`os.fsdecode`), so the
exact bytes survive (`os.fsencode`); shards.py records such a file as an error naming it, since a Parquet string
column holds UTF-8 text only. A folder that cannot be listed is an input too, so that it is recorded, with the
reason, in `_errors.jsonl` like a file that cannot be read."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError, field_validator

from extraction.config import ExtractionError
from models.image_files import IMAGE_SUFFIXES, is_utf8, scan_image_files, utf8_display


class InputRow(BaseModel):
    """One row of an input manifest (.csv or .parquet): the image's path; other columns are ignored."""

    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("empty path")
        return value


@dataclass(frozen=True)
class InputList:
    """The sorted, de-duplicated input paths, how many duplicates the source named, and which of the paths are
    folders that could not be listed (with why)."""

    paths: list[str]
    duplicates_dropped: int
    unlisted: dict[str, str] = field(default_factory=dict)


def _manifest_paths(manifest: Path, raw: Sequence[object]) -> list[str]:
    paths = []
    for row_number, value in enumerate(raw, start=1):
        undecodable = isinstance(value, str) and not is_utf8(value)  # a CSV's non-UTF-8 bytes, surrogate-escaped
        try:
            row = InputRow(path=utf8_display(value) if undecodable else value)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ExtractionError(f"{manifest}, row {row_number}: path {exc.errors()[0]['msg']}") from None
        path = Path(value.strip() if undecodable else row.path)  # pydantic holds UTF-8 text only: keep the bytes
        paths.append(os.path.abspath(path if path.is_absolute() else manifest.parent / path))
    return paths


def _csv_paths(manifest: Path) -> list[str]:
    with open(manifest, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise ExtractionError(f"{manifest}: a CSV manifest needs a 'path' column (found: {reader.fieldnames})")
        return _manifest_paths(manifest, [row["path"] for row in reader])


def _parquet_paths(manifest: Path) -> list[str]:
    try:
        schema = pq.read_schema(manifest)
    except (OSError, pa.ArrowException) as exc:
        raise ExtractionError(f"{manifest}: not a readable Parquet file ({exc})") from None
    if "path" not in schema.names:
        raise ExtractionError(f"{manifest}: a Parquet manifest needs a 'path' column (found: {schema.names})")
    return _manifest_paths(manifest, pq.read_table(manifest, columns=["path"]).column("path").to_pylist())


def list_inputs(source: str | Path) -> InputList:
    """The job's inputs: absolute paths, sorted and de-duplicated (the order shards are cut in)."""
    source = Path(source)
    unlisted: dict[str, str] = {}
    if source.is_dir():
        listing = scan_image_files(source)
        if os.fspath(source) in listing.unlisted:
            raise ExtractionError(f"{source}: {listing.unlisted[os.fspath(source)]}")
        unlisted = {os.path.abspath(folder): reason for folder, reason in listing.unlisted.items()}
        raw = [os.path.abspath(path) for path in listing.files] + list(unlisted)
    elif source.is_file() and source.suffix.lower() == ".csv":
        raw = _csv_paths(source)
    elif source.is_file() and source.suffix.lower() == ".parquet":
        raw = _parquet_paths(source)
    elif not source.exists():
        raise ExtractionError(f"input not found: {source}")
    else:
        raise ExtractionError(f"{source}: --input must be an image folder, a .csv or a .parquet manifest")
    paths = sorted(set(raw))
    if not paths:
        raise ExtractionError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return InputList(paths=paths, duplicates_dropped=len(raw) - len(paths), unlisted=unlisted)
