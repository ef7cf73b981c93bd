"""The extraction job: plan it, lock and prepare the output folder, run the pending shards on an engine,
then write `_errors.jsonl` and `_summary.json`.

Resume: `OUT/_job.json` records the job's identity (input list hash, artifact hash, options); a run into a
folder holding another job's output is refused, and finished shards are skipped. Inputs that cannot be
decoded go to `OUT/_errors/part-NNNNN.jsonl` (per shard, so resume-safe) and, at the end of a run, to
`OUT/_errors.jsonl`; the job goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from extraction.config import EmbeddingDType, EngineName, ExtractionConfig, ExtractionError
from extraction.plan import JobPlan, plan_job
from extraction.shards import (
    ERRORS_FILE,
    SUMMARY_FILE,
    ErrorRecord,
    ShardAssembler,
    ShardHook,
    completed_shards,
    errors_name,
    exclusive,
    prepare_output,
    shard_name,
)
from extraction.table import SCHEMA_VERSION
from models.files import atomic_write_text


class ExtractionSummary(BaseModel):
    """Written to OUT_DIR/_summary.json at the end of every run (counts cover the whole output)."""

    model_config = ConfigDict(protected_namespaces=())

    output: str
    input: str
    engine: EngineName
    artifact_name: str
    artifact_version: str
    artifact_sha256: str
    runtime: str
    device: str
    precision: str
    embedding_dim: int
    embedding_dtype: EmbeddingDType
    top_k: int
    images: int = Field(description="Inputs of the job (sorted, de-duplicated).")
    duplicates_dropped: int
    rows: int = Field(description="Images with a row in the shards.")
    errors: int = Field(description="Images recorded in _errors.jsonl instead.")
    unknown: int | None = Field(
        None, description="Rows flagged out-of-distribution (`unknown` column); null when the artifact has no detector."
    )
    unknown_share: float | None = Field(None, description="unknown / rows; null without a detector (or rows).")
    shards: int
    shards_skipped: int = Field(description="Shards already complete when this run started (resume).")
    shards_written: int = Field(description="Shards written by this run.")
    images_this_run: int
    elapsed_s: float
    images_per_second: float = Field(description="Images of this run / wall time of this run, end to end.")
    started_at: datetime
    finished_at: datetime
    schema_version: int = SCHEMA_VERSION


def _error_records(output: Path, shard_count: int) -> list[str]:
    lines: list[str] = []
    for shard in range(shard_count):
        path = output / errors_name(shard)
        if path.is_file():
            lines.extend(line for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
    return lines


def _count_unknown(output: Path, plan: JobPlan) -> int:
    """Rows flagged `unknown` in every shard (read back, so a resumed job counts the shards of earlier runs)."""
    return sum(
        int(pq.read_table(output / shard_name(i), columns=["unknown"]).column("unknown").to_numpy().sum())
        for i in range(plan.shard_count)
    )


def _run_engine(plan: JobPlan, assembler: ShardAssembler, pending: Sequence[int]) -> dict[str, str]:
    """Run the pending shards on the configured engine; returns the runtime's description."""
    if not pending:
        return {"device": plan.inference.device}
    if plan.config.engine == "ray":
        from extraction.ray_engine import run_ray  # Ray is an optional extra

        return run_ray(plan, assembler, pending)
    from extraction.local import run_local

    return run_local(plan, assembler, pending)


OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG})
"""OS errors that mean the output folder cannot be written (full, over quota, read-only, not permitted)."""


@contextlib.contextmanager
def _writing_to(output: Path) -> Iterator[None]:
    """An OSError from writing the output (a full or read-only filesystem, no permission) as an ExtractionError
    naming the path and the OS's reason; one about a file elsewhere (an input, the artifact) is left as is."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        path = Path(exc.filename) if exc.filename else output
        inside = os.path.abspath(path) == os.path.abspath(output) or os.path.abspath(path).startswith(os.path.abspath(output) + os.sep)
        if not inside:
            raise
        reason = exc.strerror or os.strerror(exc.errno)
        raise ExtractionError(
            f"cannot write the output {path}: {reason} ({errno.errorcode.get(exc.errno, exc.errno)}); "
            "finished shards are kept: free space or fix the folder's permissions, then run the same command "
            "again to resume"
        ) from None


def run_extraction(config: ExtractionConfig, on_shard_written: ShardHook | None = None) -> ExtractionSummary:
    """Run (or resume) the job described by `config`; returns the summary also written to `_summary.json`.
    Failing to write the output (full or read-only filesystem) raises ExtractionError, finished shards kept."""
    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    plan = plan_job(config)
    with _writing_to(config.output):
        return _run(config, plan, on_shard_written, started_at, clock)


def _run(
    config: ExtractionConfig, plan: JobPlan, on_shard_written: ShardHook | None, started_at: datetime, clock: float
) -> ExtractionSummary:
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    with exclusive(output):
        prepare_output(output, plan.identity)
        done = completed_shards(output, plan.shard_count)
        pending = [shard for shard in range(plan.shard_count) if shard not in done]
        assembler = ShardAssembler(plan, output, pending, on_shard_written)
        described = _run_engine(plan, assembler, pending)
        assembler.check_complete()

        error_lines = _error_records(output, plan.shard_count)
        atomic_write_text(output / ERRORS_FILE, "".join(line + "\n" for line in error_lines))
        rows = sum(pq.read_metadata(output / shard_name(i)).num_rows for i in range(plan.shard_count))
        unknown = _count_unknown(output, plan) if "unknown" in plan.schema.names else None
        images_this_run = sum(len(plan.shard_range(shard)) for shard in pending)
        elapsed = time.perf_counter() - clock
        summary = ExtractionSummary(
            output=str(output),
            input=str(config.input),
            engine=config.engine,
            artifact_name=plan.identity.artifact_name,
            artifact_version=plan.identity.artifact_version,
            artifact_sha256=plan.identity.artifact_sha256,
            runtime=plan.inference.runtime,
            device=described.get("device", plan.inference.device),
            precision=config.precision,
            embedding_dim=plan.manifest.embedding_dim,
            embedding_dtype=config.embedding_dtype,
            top_k=plan.identity.top_k,
            images=len(plan.inputs.paths),
            duplicates_dropped=plan.inputs.duplicates_dropped,
            rows=rows,
            errors=len(error_lines),
            unknown=unknown,
            unknown_share=round(unknown / rows, 6) if unknown is not None and rows else None,
            shards=plan.shard_count,
            shards_skipped=len(done),
            shards_written=len(assembler.written),
            images_this_run=images_this_run,
            elapsed_s=round(elapsed, 3),
            images_per_second=round(images_this_run / elapsed, 2) if elapsed > 0 else 0.0,
            started_at=started_at,
            finished_at=datetime.now(timezone.utc),
        )
        atomic_write_text(output / SUMMARY_FILE, summary.model_dump_json(indent=2) + "\n")
    return summary


def read_errors(output: str | Path) -> list[ErrorRecord]:
    """The error records of a finished job (OUT/_errors.jsonl)."""
    text = (Path(output) / ERRORS_FILE).read_text(encoding="utf-8")
    return [ErrorRecord.model_validate_json(line) for line in text.split("\n") if line.strip()]
