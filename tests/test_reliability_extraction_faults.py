"""Extraction faults: a decoding worker that crashes, and repeated SIGKILLs of the job at different
moments, lose no finished shard and never leave a partial shard visible; resuming gives the clean output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from extraction import decode as extraction_decode
from extraction.config import ExtractionConfig
from extraction.job import run_extraction
from extraction.shards import shard_name

pytestmark = pytest.mark.slow
OPTIONS = dict(shard_size=8, batch_size=8, top_k=3, show_progress=False)


def assert_visible_shards_whole(output: Path, rows: int = 8) -> list[Path]:
    visible = sorted(output.glob("*.parquet"))
    for shard in visible:
        assert pq.read_table(shard).num_rows == rows, shard
    return visible


def assert_equal_outputs(a: Path, b: Path, shards: int) -> None:
    for i in range(shards):
        assert (a / shard_name(i)).read_bytes() == (b / shard_name(i)).read_bytes(), shard_name(i)
    assert not list(a.rglob("*.tmp"))


@pytest.fixture(scope="module")
def clean(artifact_dir: Path, digits_dir: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("clean") / "out"
    run_extraction(ExtractionConfig(artifact=artifact_dir, input=digits_dir, output=output, workers=1, **OPTIONS))
    return output


def test_a_crashed_decoding_worker_loses_no_finished_shard(artifact_dir, digits_dir, clean, tmp_path, monkeypatch):
    original = extraction_decode.ImageDecoder.__call__

    def crash_at_row_40(self, batch):
        if batch["index"][0] >= 40:
            os._exit(9)  # the worker process dies without any cleanup
        return original(self, batch)

    monkeypatch.setattr(extraction_decode.ImageDecoder, "__call__", crash_at_row_40)
    output = tmp_path / "out"
    config = ExtractionConfig(artifact=artifact_dir, input=digits_dir, output=output, workers=1, **OPTIONS)
    with pytest.raises(Exception, match="(?i)worker"):
        run_extraction(config)
    visible = assert_visible_shards_whole(output)  # the worker decodes ahead, so it dies before shard 5 is
    assert 1 <= len(visible) <= 5  # consumed; the shards finished before the crash are kept, whole
    monkeypatch.setattr(extraction_decode.ImageDecoder, "__call__", original)
    resumed = run_extraction(config)
    assert resumed.shards_skipped == len(visible) and resumed.shards == 8
    assert_equal_outputs(output, clean, 8)


def test_repeated_kills_at_different_moments_then_resume(artifact_dir, digits_dir, tmp_path):
    source = tmp_path / "many"
    for copy in range(4):
        shutil.copytree(digits_dir, source / f"copy{copy}")  # 240 images -> 30 shards of 8
    output, reference = tmp_path / "killed", tmp_path / "reference"
    command = [sys.executable, "-c", "from cli import app; app()", "extract", str(artifact_dir),
               "--input", str(source), "--output", str(output), "--shard-size", "8", "--batch-size", "8",
               "--top-k", "3", "--workers", "1", "--no-progress"]  # fmt: skip
    kills = 0
    for wait_for_shards in (4, 12, 20):  # each run resumes, then is killed a few shards further on
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(output.glob("*.parquet"))) < wait_for_shards and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.kill()
        process.wait()
        kills += process.returncode == -9
        assert_visible_shards_whole(output)
    assert kills >= 2, "the job finished before it could be killed"
    config = dict(shard_size=8, batch_size=8, top_k=3, workers=1, show_progress=False)
    run_extraction(ExtractionConfig(artifact=artifact_dir, input=source, output=output, **config))
    run_extraction(ExtractionConfig(artifact=artifact_dir, input=source, output=reference, **config))
    assert_equal_outputs(output, reference, 30)
