"""The offline extraction job: image files -> Parquet shards of embeddings and predictions.

This module holds the job itself and its local engine:

* inputs: an image folder (recursive) or a .csv / .parquet manifest with a `path` column, sorted and
  de-duplicated, so the same inputs always give the same shards;
* sharding: input `i` goes to shard `i // shard_size`, written as `part-00000.parquet`, ...;
* resume: `OUT/_job.json` records the job's identity (input list hash, artifact hash, options); a run
  into a folder holding another job's output is refused, and finished shards are skipped;
* atomic writes: each shard (and its errors file) is written to a dot-prefixed temp name, fsynced and
  `os.replace`d, so no partial shard is ever visible;
* errors: inputs that cannot be decoded go to `OUT/_errors/part-NNNNN.jsonl` (per shard, so resume-safe)
  and, at the end of a run, to `OUT/_errors.jsonl`; the job goes on;
* the local engine: decoding in DataLoader worker processes (`ImageDecoder`), batched inference in this
  process (`EmbeddingPredictor`), a progress bar with images/s and ETA. The Ray engine
  (`service.extraction_ray`) shares everything here but the execution.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from models.artifact import Manifest, load_artifact
from models.runtimes import DeviceError, default_runtime, resolve_device
from service.extraction_decode import ImageDecoder
from service.extraction_schema import (
    ERRORS_DIR,
    ERRORS_FILE,
    JOB_FILE,
    SUMMARY_FILE,
    ErrorRecord,
    ExtractionConfig,
    ExtractionError,
    ExtractionSummary,
    InputRow,
    JobIdentity,
    artifact_sha256,
    build_shard_table,
    effective_top_k,
    errors_name,
    inputs_sha256,
    schema_for,
    shard_name,
)
from training.data import IMAGE_SUFFIXES

LOCK_FILE = "_lock"
ShardHook = Callable[[int], None]
"""Called with a shard's number right after the shard is visible in the output folder."""


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputList:
    paths: list[str]
    duplicates_dropped: int


def _images_in_folder(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(os.path.abspath(os.path.join(root, name)))
    return found


def _manifest_paths(manifest: Path, raw: Sequence[object]) -> list[str]:
    paths = []
    for row_number, value in enumerate(raw, start=1):
        try:
            row = InputRow(path=value)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ExtractionError(f"{manifest}, row {row_number}: path {exc.errors()[0]['msg']}") from None
        path = Path(row.path)
        paths.append(os.path.abspath(path if path.is_absolute() else manifest.parent / path))
    return paths


def _csv_paths(manifest: Path) -> list[str]:
    with open(manifest, newline="") as handle:
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
    if source.is_dir():
        raw = _images_in_folder(source)
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
    return InputList(paths=paths, duplicates_dropped=len(raw) - len(paths))


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class JobPlan:
    """Everything fixed before any image is read: inputs, shards, identity, schema, resolved runtime."""

    config: ExtractionConfig
    manifest: Manifest
    inputs: InputList
    identity: JobIdentity
    schema: pa.Schema
    device: str
    runtime: str

    @property
    def shard_count(self) -> int:
        return -(-len(self.inputs.paths) // self.config.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.config.shard_size
        return range(start, min(start + self.config.shard_size, len(self.inputs.paths)))

    def predictor_kwargs(self) -> dict:
        """Constructor arguments of `EmbeddingPredictor` (plain data, so Ray can ship them to actors)."""
        return dict(
            artifact=str(Path(self.config.artifact).resolve()),  # actors may run elsewhere
            runtime=self.runtime,
            device=self.device,
            precision=self.config.precision,
            top_k=self.identity.top_k,
            embedding_dtype=self.config.embedding_dtype,
        )


def _resolve_execution(config: ExtractionConfig) -> tuple[str, str]:
    if config.engine == "ray" and config.device == "auto":
        device = "cuda" if config.ray.num_gpus > 0 else "cpu"
    elif config.engine == "ray":
        device = config.device
    else:
        try:
            device = resolve_device(config.device)
        except DeviceError as exc:
            raise ExtractionError(str(exc)) from None
    runtime = default_runtime(device) if config.runtime == "auto" else config.runtime
    if runtime == "onnx" and config.precision != "fp32":
        raise ExtractionError(f"precision {config.precision} needs --runtime torchscript (ONNX runs fp32)")
    return device, runtime


def plan_job(config: ExtractionConfig) -> JobPlan:
    manifest = load_artifact(config.artifact).manifest
    inputs = list_inputs(config.input)
    device, runtime = _resolve_execution(config)
    identity = JobIdentity(
        inputs_sha256=inputs_sha256(inputs.paths),
        inputs_count=len(inputs.paths),
        artifact_name=manifest.name,
        artifact_version=manifest.version,
        artifact_sha256=artifact_sha256(manifest),
        runtime=runtime,
        precision=config.precision,
        shard_size=config.shard_size,
        top_k=effective_top_k(config.top_k, manifest),
        embedding_dtype=config.embedding_dtype,
        max_pixels=config.max_pixels,
    )
    return JobPlan(config, manifest, inputs, identity, schema_for(identity, manifest), device, runtime)


# ---------------------------------------------------------------------------------------------- output folder


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Write through `write(handle)` to a dot-prefixed temp file beside `path`, fsync, then rename."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text.encode()))  # type: ignore[attr-defined]


@contextlib.contextmanager
def _exclusive(output: Path) -> Iterator[None]:
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
        _write_text(job_file, identity.model_dump_json(indent=2) + "\n")
    for stale in list(output.glob(".*.tmp")) + list((output / ERRORS_DIR).glob(".*.tmp")):
        stale.unlink(missing_ok=True)  # left by a killed run; never visible as a shard


def completed_shards(output: Path, shard_count: int) -> set[int]:
    return {i for i in range(shard_count) if (output / shard_name(i)).is_file()}


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([np.asarray(part[key]) for part in parts]) for key in parts[0]}


def _select(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {key: np.asarray(value)[mask] for key, value in columns.items()}


def write_shard(output: Path, shard: int, outputs: dict[str, np.ndarray], plan: JobPlan) -> None:
    """Write one shard's errors file, then its Parquet file; the Parquet file appearing marks it done."""
    failed = np.array([bool(e) for e in outputs["error"]], dtype=bool)
    errors = [
        ErrorRecord(index=int(i), path=str(p), reason=str(r))
        for i, p, r in zip(outputs["index"][failed], outputs["path"][failed], outputs["error"][failed])
    ]
    errors.sort(key=lambda e: e.index)
    text = "".join(e.model_dump_json() + "\n" for e in errors)
    _write_text(output / errors_name(shard), text)
    table = build_shard_table(_select(outputs, ~failed), plan.manifest.labels, plan.schema)
    _atomic_write(output / shard_name(shard), lambda handle: pq.write_table(table, handle, compression="zstd"))


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


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


# ---------------------------------------------------------------------------------------------- local engine


class _BatchDataset:
    """Item i = the decoded batch i (a map-style dataset for a DataLoader with batch_size=None)."""

    def __init__(self, paths: Sequence[str], batches: Sequence[range], decoder: ImageDecoder) -> None:
        self.paths = paths
        self.batches = batches
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rows = self.batches[i]
        return self.decoder(
            {"index": np.arange(rows.start, rows.stop, dtype=np.int64), "path": np.asarray(self.paths[rows.start:rows.stop], dtype=object)}
        )


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


def _pending_batches(plan: JobPlan, pending: Sequence[int]) -> list[range]:
    size = plan.config.batch_size
    batches = []
    for shard in pending:
        rows = plan.shard_range(shard)
        batches.extend(range(start, min(start + size, rows.stop)) for start in range(rows.start, rows.stop, size))
    return batches


def run_local(plan: JobPlan, assembler: ShardAssembler, pending: Sequence[int]) -> dict[str, str]:
    """Decode in `workers` processes, infer here, write shards as they complete; returns the runtime's description."""
    from torch.utils.data import DataLoader

    from service.extraction_predictor import EmbeddingPredictor

    config = plan.config
    batches = _pending_batches(plan, pending)
    dataset = _BatchDataset(plan.inputs.paths, batches, ImageDecoder(plan.manifest.preprocessing, config.max_pixels))
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=None,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=_as_is,
        prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
    )
    decoded = iter(loader)  # workers start decoding while the model loads
    try:
        predictor = EmbeddingPredictor(**plan.predictor_kwargs())
        with progress_bar(sum(len(b) for b in batches), config.show_progress, "extract") as bar:
            for batch in decoded:
                bar.update(assembler.add(predictor(batch)))
        return predictor.describe()
    finally:
        del decoded  # shuts the decoding workers down, also when interrupted


# ---------------------------------------------------------------------------------------------- the job


def _error_records(output: Path, shard_count: int) -> list[str]:
    lines: list[str] = []
    for shard in range(shard_count):
        path = output / errors_name(shard)
        if path.is_file():
            lines.extend(line for line in path.read_text().splitlines() if line.strip())
    return lines


def run_extraction(config: ExtractionConfig, on_shard_written: ShardHook | None = None) -> ExtractionSummary:
    """Run (or resume) the job described by `config`; returns the summary also written to `_summary.json`."""
    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    plan = plan_job(config)
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    with _exclusive(output):
        prepare_output(output, plan.identity)
        done = completed_shards(output, plan.shard_count)
        pending = [shard for shard in range(plan.shard_count) if shard not in done]
        assembler = ShardAssembler(plan, output, pending, on_shard_written)
        described = {"device": plan.device}
        if pending and config.engine == "ray":
            from service.extraction_ray import run_ray

            described = run_ray(plan, assembler, pending)
        elif pending:
            described = run_local(plan, assembler, pending)
        assembler.check_complete()

        error_lines = _error_records(output, plan.shard_count)
        _write_text(output / ERRORS_FILE, "".join(line + "\n" for line in error_lines))
        rows = sum(pq.read_metadata(output / shard_name(i)).num_rows for i in range(plan.shard_count))
        images_this_run = sum(len(plan.shard_range(shard)) for shard in pending)
        elapsed = time.perf_counter() - clock
        summary = ExtractionSummary(
            output=str(output),
            input=str(config.input),
            engine=config.engine,
            artifact_name=plan.identity.artifact_name,
            artifact_version=plan.identity.artifact_version,
            artifact_sha256=plan.identity.artifact_sha256,
            runtime=plan.runtime,
            device=described.get("device", plan.device),
            precision=config.precision,
            embedding_dim=plan.manifest.embedding_dim,
            embedding_dtype=config.embedding_dtype,
            top_k=plan.identity.top_k,
            images=len(plan.inputs.paths),
            duplicates_dropped=plan.inputs.duplicates_dropped,
            rows=rows,
            errors=len(error_lines),
            shards=plan.shard_count,
            shards_skipped=len(done),
            shards_written=len(assembler.written),
            images_this_run=images_this_run,
            elapsed_s=round(elapsed, 3),
            images_per_second=round(images_this_run / elapsed, 2) if elapsed > 0 else 0.0,
            started_at=started_at,
            finished_at=datetime.now(timezone.utc),
        )
        _write_text(output / SUMMARY_FILE, summary.model_dump_json(indent=2) + "\n")
    return summary


def read_errors(output: str | Path) -> list[ErrorRecord]:
    """The error records of a finished job (OUT/_errors.jsonl)."""
    text = (Path(output) / ERRORS_FILE).read_text()
    return [ErrorRecord.model_validate_json(line) for line in text.splitlines() if line.strip()]


__all__ = [
    "ExtractionConfig",
    "ExtractionError",
    "InputList",
    "JobPlan",
    "ShardAssembler",
    "list_inputs",
    "plan_job",
    "read_errors",
    "run_extraction",
    "write_shard",
]
