"""The offline extraction job (local engine): embeddings equal the Predictor's, schema, errors, resume, CLI."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from models.predictor import Predictor
from models.decoding import load_image
from cli import app
from extraction import shards
from extraction.config import ExtractionConfig, ExtractionError
from extraction.inputs import list_inputs
from extraction.job import ExtractionSummary, read_errors, run_extraction
from extraction.shards import ERRORS_FILE, JOB_FILE, SUMMARY_FILE, shard_name
from extraction.table import METADATA_KEY, shard_schema

SHARD_SIZE = 16
BATCH_SIZE = 8
CORRUPT = {"0/truncated.jpg": b"\xff\xd8\xff\xe0 truncated jpeg", "2/not_an_image.png": b"plain text, not a PNG"}


@pytest.fixture(scope="module")
def images(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real digit PNGs, two corrupt files, and one non-image file the job must ignore."""
    folder = tmp_path_factory.mktemp("extract") / "images"
    shutil.copytree(digits_dir, folder)
    for name, data in CORRUPT.items():
        (folder / name).write_bytes(data)
    (folder / "README.txt").write_text("not an image suffix: not an input")
    return folder


def config_for(artifact: Path, source: Path, output: Path, **overrides) -> ExtractionConfig:
    options = dict(shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, workers=0, top_k=3, show_progress=False)
    return ExtractionConfig(artifact=artifact, input=source, output=output, **(options | overrides))


def read_output(output: Path) -> pa.Table:
    return pads.dataset(output, format="parquet").to_table()


def embeddings_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy().reshape(len(table), column.type.list_size)


@pytest.fixture(scope="module")
def clean_run(artifact_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExtractionSummary]:
    output = tmp_path_factory.mktemp("extract") / "clean"
    return output, run_extraction(config_for(artifact_dir, images, output))


def test_embeddings_and_predictions_equal_the_predictor(clean_run, artifact_dir: Path) -> None:
    output, _ = clean_run
    table = read_output(output)
    paths = table.column("path").to_pylist()
    predictor = Predictor.from_artifact(artifact_dir)  # the service's path: same runtime (auto) and preprocessing
    expected = predictor.predict([load_image(p) for p in paths])
    np.testing.assert_allclose(embeddings_of(table), expected.embeddings, atol=1e-5, rtol=0)
    best = predictor.top_k(expected.probabilities, 3)
    assert table.column("topk_labels").to_pylist() == [b.labels for b in best]
    assert table.column("top1_label").to_pylist() == [b.labels[0] for b in best]
    np.testing.assert_allclose(
        np.array(table.column("topk_probabilities").to_pylist()), [b.probabilities for b in best], atol=1e-5
    )
    one = predictor.predict([load_image(paths[7])])  # a batch of one gives the same embedding as the job's batch
    np.testing.assert_allclose(embeddings_of(table)[7], one.embeddings[0], atol=1e-5, rtol=0)


def test_output_reads_back_in_the_documented_schema(clean_run, artifact_dir: Path) -> None:
    output, summary = clean_run
    shards = sorted(p.name for p in output.glob("*.parquet"))
    assert shards == [shard_name(i) for i in range(4)]  # 62 inputs / 16 per shard
    manifest = Predictor.from_artifact(artifact_dir).manifest
    schema = pq.read_schema(output / shards[0])
    assert schema.remove_metadata().equals(shard_schema(manifest.embedding_dim, 3, "float32", ood=True))
    assert f'"artifact_version": "{manifest.version}"' in schema.metadata[METADATA_KEY].decode()

    frame = pd.read_parquet(output)  # the folder reads as one table: only the shards lack a '_' prefix
    assert list(frame.columns) == [
        "index", "path", "embedding", "top1_label", "top1_probability", "topk_labels", "topk_probabilities",
        "ood_score", "unknown",  # the artifact has an OOD detector (docs/OOD.md)
    ]
    assert len(frame) == 60 and frame["index"].is_monotonic_increasing
    assert frame["embedding"].map(len).eq(manifest.embedding_dim).all()
    assert frame["embedding"].iloc[0].dtype == np.float32
    assert set(frame["top1_label"]) <= set(manifest.labels)
    assert frame["path"].map(lambda p: Path(p).is_absolute()).all()

    assert summary.rows == 60 and summary.errors == 2 and summary.images == 62
    assert summary.shards == 4 and summary.shards_written == 4 and summary.shards_skipped == 0
    assert summary.artifact_version == manifest.version and summary.images_per_second > 0
    assert ExtractionSummary.model_validate_json((output / SUMMARY_FILE).read_text()) == summary
    assert (output / JOB_FILE).is_file()


def test_corrupt_files_are_recorded_and_the_rest_processed(clean_run, images: Path) -> None:
    output, _ = clean_run
    errors = read_errors(output)
    assert sorted(Path(e.path).relative_to(images).as_posix() for e in errors) == sorted(CORRUPT)
    assert all(e.reason for e in errors)
    assert {Path(e.path).name: e.reason for e in errors}["not_an_image.png"].startswith("not an image")
    listed = list_inputs(images).paths
    assert all(listed[e.index] == e.path for e in errors)
    produced = set(read_output(output).column("path").to_pylist())
    assert produced | {e.path for e in errors} == set(listed) and not produced & {e.path for e in errors}


def test_interrupted_run_resumes_to_the_clean_output(clean_run, artifact_dir: Path, images: Path, tmp_path: Path) -> None:
    clean_output, _ = clean_run
    output = tmp_path / "resumed"

    class Killed(Exception):
        pass

    def stop_after_two(shard: int) -> None:
        if shard == 1:
            raise Killed

    with pytest.raises(Killed):
        run_extraction(config_for(artifact_dir, images, output), on_shard_written=stop_after_two)
    assert sorted(p.name for p in output.glob("*.parquet")) == [shard_name(0), shard_name(1)]
    assert not list(output.rglob("*.tmp")) and not (output / SUMMARY_FILE).exists()

    summary = run_extraction(config_for(artifact_dir, images, output, workers=2))  # decoding in worker processes
    assert (summary.shards_skipped, summary.shards_written, summary.images_this_run) == (2, 2, 30)
    for i in range(4):
        assert pq.read_table(output / shard_name(i)).equals(pq.read_table(clean_output / shard_name(i)))
        assert (output / shard_name(i)).read_bytes() == (clean_output / shard_name(i)).read_bytes()
    assert (output / ERRORS_FILE).read_text() == (clean_output / ERRORS_FILE).read_text()

    again = run_extraction(config_for(artifact_dir, images, output))
    assert (again.shards_skipped, again.shards_written, again.rows, again.errors) == (4, 0, 60, 2)


def test_a_failed_shard_write_leaves_no_partial_shard(artifact_dir: Path, images: Path, tmp_path: Path, monkeypatch) -> None:
    output = tmp_path / "out"
    real_write = pq.write_table
    calls = []

    def failing_write(table, where, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            where.write(b"PAR1 half a shard")
            raise OSError("disk full")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(shards.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run_extraction(config_for(artifact_dir, images, output))
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith("_")) == [shard_name(0)]
    assert pq.read_table(output / shard_name(0)).num_rows > 0


def test_float16_embeddings(clean_run, artifact_dir: Path, images: Path, tmp_path: Path) -> None:
    clean_output, _ = clean_run
    run_extraction(config_for(artifact_dir, images, tmp_path / "fp16", embedding_dtype="float16", shard_size=64))
    table = read_output(tmp_path / "fp16")
    assert table.schema.field("embedding").type.value_type == pa.float16()
    half = embeddings_of(table).astype(np.float32)
    full = embeddings_of(read_output(clean_output))
    np.testing.assert_allclose(half, full, rtol=1e-3, atol=1e-3)


def test_manifest_inputs_csv_and_parquet(clean_run, artifact_dir: Path, images: Path, tmp_path: Path) -> None:
    clean = read_output(clean_run[0])
    chosen = sorted(p.relative_to(images).as_posix() for p in images.glob("1/*.png"))[:5]
    manifest_csv = images / "subset.csv"  # relative paths resolve from the manifest's folder
    with open(manifest_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "note"])
        writer.writerows([[p, "x"] for p in chosen + chosen[:2]])  # duplicates are dropped
    manifest_parquet = tmp_path / "subset.parquet"
    pq.write_table(pa.table({"path": [str(images / p) for p in chosen]}), manifest_parquet)
    try:
        from_csv = run_extraction(config_for(artifact_dir, manifest_csv, tmp_path / "csv"))
        run_extraction(config_for(artifact_dir, manifest_parquet, tmp_path / "parquet"))
    finally:
        manifest_csv.unlink()
    assert from_csv.duplicates_dropped == 2 and from_csv.rows == 5
    by_path = {p: i for i, p in enumerate(clean.column("path").to_pylist())}
    for name in ("csv", "parquet"):
        table = read_output(tmp_path / name)
        assert table.column("path").to_pylist() == [str(images / p) for p in chosen]
        rows = [by_path[p] for p in table.column("path").to_pylist()]
        np.testing.assert_allclose(embeddings_of(table), embeddings_of(clean)[rows], atol=1e-5, rtol=0)


def test_resume_refuses_another_job(clean_run, artifact_dir: Path, images: Path, tmp_path: Path) -> None:
    output = tmp_path / "copy"
    shutil.copytree(clean_run[0], output)
    with pytest.raises(ExtractionError, match="different job.*top_k 3 -> 2"):
        run_extraction(config_for(artifact_dir, images, output, top_k=2))
    subset = tmp_path / "subset"
    shutil.copytree(images / "3", subset / "3")
    with pytest.raises(ExtractionError, match="different job.*inputs_sha256"):
        run_extraction(config_for(artifact_dir, subset, output))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("someone's files")
    with pytest.raises(ExtractionError, match="not empty"):
        run_extraction(config_for(artifact_dir, subset, stranger))


def test_cli_extract(artifact_dir: Path, images: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["extract", str(artifact_dir), "--input", str(images / "3"), "--output", str(tmp_path / "out"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    summary = ExtractionSummary.model_validate_json(result.stdout)
    assert summary.rows == 15 and summary.errors == 0 and summary.shards == 1


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing-artifact", "artifact directory not found"),
        ("missing-input", "input not found"),
        ("bad-input", "must be an image folder, a .csv or a .parquet manifest"),
        ("empty-input", "no images found"),
        ("bad-option", "invalid option: embedding_dtype"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(case: str, expected: str, artifact_dir: Path, tmp_path: Path) -> None:
    artifact, source = artifact_dir, tmp_path / "in"
    extra: list[str] = []
    source.mkdir()
    if case == "missing-artifact":
        artifact = tmp_path / "no-such-artifact"
    elif case == "missing-input":
        source = tmp_path / "nowhere"
    elif case == "bad-input":
        source = tmp_path / "list.txt"
        source.write_text("a.png\n")
    elif case == "bad-option":
        extra = ["--embedding-dtype", "float64"]
    result = CliRunner().invoke(
        app, ["extract", str(artifact), "--input", str(source), "--output", str(tmp_path / "out"), *extra]
    )
    assert result.exit_code == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_killed_process_resumes_to_the_clean_output(artifact_dir: Path, digits_dir: Path, tmp_path: Path) -> None:
    """SIGKILL the CLI mid-run (no cleanup code runs), then resume: the output equals an uninterrupted run."""
    import subprocess
    import sys
    import time

    source = tmp_path / "many"
    for copy in range(7):
        shutil.copytree(digits_dir, source / f"copy{copy}")  # 420 images -> 53 shards of 8
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["--shard-size", "8", "--batch-size", "8", "--top-k", "3", "--workers", "1", "--no-progress"]
    command = [sys.executable, "-c", "from cli import app; app()", "extract", str(artifact_dir),
               "--input", str(source), "--output", str(killed), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / shard_name(2)).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    visible = sorted(killed.glob("*.parquet"))
    assert 3 <= len(visible) < 53, "the job was not killed mid-run"
    assert all(pq.read_table(p).num_rows == 8 for p in visible)  # every visible shard is whole

    config = dict(shard_size=8, batch_size=8, top_k=3, workers=1)
    resumed = run_extraction(config_for(artifact_dir, source, killed, **config))
    assert resumed.shards_skipped == len(visible) and resumed.shards == 53
    run_extraction(config_for(artifact_dir, source, clean, **config))
    assert not list(killed.rglob("*.tmp"))
    for i in range(53):
        assert (killed / shard_name(i)).read_bytes() == (clean / shard_name(i)).read_bytes()
    assert (killed / ERRORS_FILE).read_text() == (clean / ERRORS_FILE).read_text() == ""


def test_shards_of_only_unreadable_files_are_empty_but_complete(artifact_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "bad"
    source.mkdir()
    (source / "a.jpg").write_bytes(b"")
    (source / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    summary = run_extraction(config_for(artifact_dir, source, tmp_path / "out", shard_size=1))
    assert (summary.shards, summary.rows, summary.errors) == (2, 0, 2)
    assert [pq.read_table(tmp_path / "out" / shard_name(i)).num_rows for i in range(2)] == [0, 0]
    assert pd.read_parquet(tmp_path / "out").empty
    assert [e.index for e in read_errors(tmp_path / "out")] == [0, 1]
