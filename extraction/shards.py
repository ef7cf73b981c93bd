"""The job's output folder: file names, the lock, `prepare_output` (start, resume or refuse), atomic shard
writes and `ShardAssembler`, which turns predictor outputs into complete shards.

Input `i` goes to shard `i // shard_size`, written as `part-00000.parquet`, ...; each shard (and its errors
file, `_errors/part-NNNNN.jsonl`) is written through `models.files.atomic_write`, so no partial shard is
ever visible, and a shard's Parquet file appearing marks it done (the unit of resume).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from extraction.config import ExtractionError
from extraction.plan import JobIdentity, JobPlan
from extraction.table import build_shard_table
from models.files import atomic_write, atomic_write_text
from models.image_files import is_utf8, utf8_display

SHARD_PATTERN = "part-{:05d}.parquet"
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
ERRORS_FILE = "_errors.jsonl"
ERRORS_DIR = "_errors"
"""Everything but the shards starts with '_' so `pd.read_parquet(OUT_DIR)` reads the shards alone."""


LOCK_FILE = "_lock"

ShardHook = Callable[[int], None]
"""Called with a shard's number right after the shard is visible in the output folder."""


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def errors_name(index: int) -> str:
    return f"{ERRORS_DIR}/part-{index:05d}.jsonl"


class ErrorRecord(BaseModel):
    """One input that produced no row: its position in the sorted input list, path and reason.

    `path` is UTF-8 text; a name whose bytes are not UTF-8 shows them as `\\xNN` there and is given exactly, as
    hex, in `path_bytes_hex` (null otherwise), so every record is valid JSON and no path is lost."""

    index: int
    path: str
    reason: str
    path_bytes_hex: str | None = None

    @classmethod
    def of(cls, index: int, path: str, reason: str) -> "ErrorRecord":
        """The record of input `index`, whose `path` is as the OS gave it (surrogate escapes for non-UTF-8 bytes)."""
        if is_utf8(path):
            return cls(index=index, path=path, reason=utf8_display(reason))
        return cls(index=index, path=utf8_display(path), reason=utf8_display(reason), path_bytes_hex=os.fsencode(path).hex())

    @property
    def os_path(self) -> str:
        """The path as the OS names it (what `ErrorRecord.of` was given)."""
        return os.fsdecode(bytes.fromhex(self.path_bytes_hex)) if self.path_bytes_hex is not None else self.path


NOT_UTF8_REASON = (
    "file name is not valid UTF-8: the Parquet `path` column holds UTF-8 text only, so this image gets no row; "
    "rename the file to extract it"
)




@contextlib.contextmanager
def exclusive(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder, released by the OS when this process dies.

    A POSIX record lock (`lockf`), not `flock`: forked decoding workers do not inherit it, so a killed
    job's orphaned workers cannot keep the folder locked while they wind down.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    with open(output / LOCK_FILE, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ExtractionError(f"another extraction job is writing to {output}") from None
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def prepare_output(output: Path, identity: JobIdentity) -> None:
    """Create the output folder and record the job, or check that it holds this same job's output."""
    output.mkdir(parents=True, exist_ok=True)
    (output / ERRORS_DIR).mkdir(exist_ok=True)
    job_file = output / JOB_FILE
    if job_file.exists():
        try:
            previous = JobIdentity.model_validate_json(job_file.read_text())
        except ValidationError as exc:
            raise ExtractionError(f"{job_file} is not a job record this version reads: {exc.errors()[0]['msg']}") from None
        if previous != identity:
            raise ExtractionError(
                f"{output} holds the output of a different job ({'; '.join(identity.differences(previous))}); "
                "resuming would mix outputs, so choose another --output (or delete this one to start over)"
            )
    else:
        unexpected = sorted(p.name for p in output.iterdir() if p.name not in (LOCK_FILE, ERRORS_DIR))
        if unexpected or any((output / ERRORS_DIR).iterdir()):
            raise ExtractionError(
                f"{output} is not empty and holds no {JOB_FILE} (found {', '.join(unexpected[:3]) or ERRORS_DIR}); "
                "choose a new or empty --output folder"
            )
        atomic_write_text(job_file, identity.model_dump_json(indent=2) + "\n")
    for stale in list(output.glob(".*.tmp")) + list((output / ERRORS_DIR).glob(".*.tmp")):
        stale.unlink(missing_ok=True)  # left by a killed run; never visible as a shard


def completed_shards(output: Path, shard_count: int) -> set[int]:
    return {i for i in range(shard_count) if (output / shard_name(i)).is_file()}


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([np.asarray(part[key]) for part in parts]) for key in parts[0]}


def _select(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {key: np.asarray(value)[mask] for key, value in columns.items()}


def write_shard(output: Path, shard: int, outputs: dict[str, np.ndarray], plan: JobPlan) -> None:
    """Write one shard's errors file, then its Parquet file; the Parquet file appearing marks it done. Paths come
    from the plan (by index), whatever form an engine carried them in; a folder that could not be listed gets its
    listing error, and an image whose name is not UTF-8 an error naming that."""
    inputs = plan.inputs
    paths = [inputs.paths[i] for i in np.asarray(outputs["index"], dtype=np.int64)]
    reasons = [inputs.unlisted.get(path) or str(error) for path, error in zip(paths, outputs["error"])]
    reasons = [reason or ("" if is_utf8(path) else NOT_UTF8_REASON) for path, reason in zip(paths, reasons)]
    outputs = outputs | {"path": np.asarray(paths, dtype=object), "error": np.asarray(reasons, dtype=object)}
    failed = np.array([bool(reason) for reason in reasons], dtype=bool)
    errors = [
        ErrorRecord.of(int(i), p, r)
        for i, p, r in zip(outputs["index"][failed], outputs["path"][failed], outputs["error"][failed])
    ]
    errors.sort(key=lambda e: e.index)
    text = "".join(e.model_dump_json() + "\n" for e in errors)
    atomic_write_text(output / errors_name(shard), text)
    table = build_shard_table(_select(outputs, ~failed), plan.manifest.labels, plan.schema)
    atomic_write(output / shard_name(shard), lambda handle: pq.write_table(table, handle, compression="zstd"))


class ShardAssembler:
    """Collects predictor outputs (in any order, any batch cut) and writes each shard once it is complete."""

    def __init__(self, plan: JobPlan, output: Path, pending: Sequence[int], on_shard_written: ShardHook | None) -> None:
        self.plan = plan
        self.output = output
        self.remaining = {shard: len(plan.shard_range(shard)) for shard in pending}
        self.parts: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.on_shard_written = on_shard_written
        self.written: list[int] = []

    def add(self, outputs: dict[str, np.ndarray]) -> int:
        index = np.asarray(outputs["index"], dtype=np.int64)
        shards = index // self.plan.config.shard_size
        for shard in np.unique(shards):
            shard = int(shard)
            part = _select(outputs, shards == shard)
            if shard not in self.remaining:
                raise ExtractionError(f"internal error: rows for shard {shard}, which is not pending")
            self.parts[shard].append(part)
            self.remaining[shard] -= len(part["index"])
            if self.remaining[shard] == 0:
                write_shard(self.output, shard, _concat(self.parts.pop(shard)), self.plan)
                del self.remaining[shard]
                self.written.append(shard)
                if self.on_shard_written is not None:
                    self.on_shard_written(shard)
        return len(index)

    def check_complete(self) -> None:
        if self.remaining:
            raise ExtractionError(f"the engine returned no rows for part of shards {sorted(self.remaining)[:5]}")
