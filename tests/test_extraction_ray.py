"""The extraction job on Ray Data (local Ray): same rows and embeddings as the local engine, same shards."""

from __future__ import annotations

import json

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from extraction.config import ExtractionConfig, RayOptions
from extraction.job import read_errors, run_extraction
from extraction.shards import shard_name
from extraction.table import METADATA_KEY

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

ray = pytest.importorskip("ray", reason="the Ray engine is an optional extra: pip install .[ray]")

SHARD_SIZE = 16


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (startup costs ~10 s); 2 CPUs, no dashboard."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("extract_ray") / "images"
    shutil.copytree(digits_dir, folder)
    (folder / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return folder


def config_for(artifact: Path, source: Path, output: Path, engine: str, **overrides) -> ExtractionConfig:
    options = dict(shard_size=SHARD_SIZE, batch_size=8, workers=0, top_k=3, show_progress=False, engine=engine)
    return ExtractionConfig(artifact=artifact, input=source, output=output, **(options | overrides))


@pytest.fixture(scope="module")
def local_output(artifact_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("extract_ray") / "local"
    run_extraction(config_for(artifact_dir, images, output, "local"))
    return output


def embeddings(output: Path) -> np.ndarray:
    column = pads.dataset(output, format="parquet").to_table().column("embedding").combine_chunks()
    return column.values.to_numpy().reshape(-1, column.type.list_size)


def assert_same_output(ray_output: Path, local_output: Path) -> None:
    local_shards = sorted(p.name for p in local_output.glob("*.parquet"))
    assert sorted(p.name for p in ray_output.glob("*.parquet")) == local_shards
    for name in local_shards:
        ours, theirs = pq.read_table(ray_output / name), pq.read_table(local_output / name)
        assert ours.schema.equals(theirs.schema, check_metadata=True)
        floats = ["embedding", "topk_probabilities", "top1_probability"]
        floats += [c for c in ("ood_score", "unknown") if c in theirs.column_names]  # OOD: compared below
        assert ours.drop_columns(floats).equals(theirs.drop_columns(floats))
        if "ood_score" in theirs.column_names:  # a batch cut changes the outputs by ~1e-6
            ours_score, theirs_score = (t.column("ood_score").to_numpy() for t in (ours, theirs))
            np.testing.assert_allclose(ours_score, theirs_score, atol=1e-5, rtol=0)
            threshold = json.loads(theirs.schema.metadata[METADATA_KEY])["ood_threshold"]
            clear = np.abs(theirs_score - threshold) > 1e-5  # not within rounding of the threshold
            assert (ours.column("unknown").to_numpy()[clear] == theirs.column("unknown").to_numpy()[clear]).all()
        np.testing.assert_allclose(
            np.array(ours.column("topk_probabilities").to_pylist()),
            np.array(theirs.column("topk_probabilities").to_pylist()),
            atol=1e-5,
        )
    np.testing.assert_allclose(embeddings(ray_output), embeddings(local_output), atol=1e-5, rtol=0)
    assert read_errors(ray_output) == read_errors(local_output)


def test_ray_engine_equals_local_engine(local_ray, artifact_dir: Path, images: Path, local_output: Path, tmp_path: Path) -> None:
    options = RayOptions(concurrency=1, num_gpus=0, cpus_per_actor=1, decode_cpus=0.5)  # decoding as separate tasks
    summary = run_extraction(config_for(artifact_dir, images, tmp_path / "ray", "ray", ray=options))
    assert summary.engine == "ray" and summary.rows == 60 and summary.errors == 1
    assert summary.shards == 4 and summary.shards_written == 4
    assert_same_output(tmp_path / "ray", local_output)


def test_ray_resumes_a_local_run_with_the_same_shards(
    local_ray, artifact_dir: Path, images: Path, local_output: Path, tmp_path: Path
) -> None:
    output = tmp_path / "mixed"

    class Killed(Exception):
        pass

    def stop(shard: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_extraction(config_for(artifact_dir, images, output, "local"), on_shard_written=stop)
    assert sorted(p.name for p in output.glob("*.parquet")) == [shard_name(0)]
    summary = run_extraction(config_for(artifact_dir, images, output, "ray"))
    assert (summary.shards_skipped, summary.shards_written) == (1, 3)
    assert_same_output(output, local_output)


RAY_PROCESSES = ("raylet", "gcs_server", "dashboard", "runtime_env", "agent")


@pytest.mark.slow
def test_sigkill_of_a_ray_job_ends_the_local_ray_it_started(artifact_dir: Path, tmp_path: Path):
    """`kill -9` of `extract --engine ray`: the local Ray it started (GCS, raylet, dashboard and runtime-env agents,
    workers) ends with it (issue 21, item 5)."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from test_reliability_extraction_hostile import kill_leftovers, write_slow_images

    root = Path(__file__).resolve().parents[1]
    write_slow_images(tmp_path / "in", 400)
    command = [sys.executable, "-m", "cli", "extract", str(artifact_dir), "--input", str(tmp_path / "in"), "--output",
               str(tmp_path / "out"), "--engine", "ray", "--ray-num-cpus", "2", "--shard-size", "8", "--batch-size", "4",
               "--no-progress"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(root)}
    job = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "out" / shard_name(0)).exists():
            assert job.poll() is None, "the job ended before a shard was written"
            assert time.monotonic() < deadline, "no shard after 240 s"
            family |= {p.pid: p for p in psutil.Process(job.pid).children(recursive=True)}
            time.sleep(0.2)
        family |= {p.pid: p for p in psutil.Process(job.pid).children(recursive=True)}
        names = " ".join(" ".join(p.cmdline()) for p in family.values() if p.is_running())
        assert "raylet" in names and "gcs_server" in names, names[:2000]
        job.kill()
        job.wait(10)
        _, alive = psutil.wait_procs(list(family.values()), timeout=30)
        assert not alive, f"Ray processes alive 30 s after the job was killed: {[p.name() for p in alive]}"
    finally:
        kill_leftovers(job, family.values())
