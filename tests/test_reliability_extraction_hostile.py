"""The extraction job against hostile inputs and a hostile environment: special files in the input folder
(a FIFO, a symlink to /dev/zero, a socket, a huge sparse file), its own process killed with SIGKILL (its
decoding workers must end with it), and an output filesystem that is full (one `error:` line, exit 2,
and a resume after freeing space gives the same bytes)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from extraction import shards
from extraction.job import read_errors, run_extraction
from extraction.shards import shard_name
from models.decoding import DEFAULT_MAX_FILE_BYTES
from models.image_files import list_image_files
from test_extraction import config_for, read_output

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def special_folder(digits_dir: Path, tmp_path: Path):
    """The 60 digit PNGs plus four things named like images that are not regular image files."""
    folder = tmp_path / "in"
    shutil.copytree(digits_dir, folder)
    os.mkfifo(folder / "pipe.png")
    os.symlink("/dev/zero", folder / "zero.jpg")
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(DEFAULT_MAX_FILE_BYTES + 1)  # sparse: no disk used
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(folder / "sock.png"))
    try:
        yield folder
    finally:
        server.close()


SPECIAL_REASONS = {
    "pipe.png": "not a regular file (a FIFO)",
    "zero.jpg": "not a regular file (a character device)",
    "sock.png": "not a regular file (a socket)",
    "huge.jpg": f"file is {DEFAULT_MAX_FILE_BYTES + 1} bytes, over the limit of {DEFAULT_MAX_FILE_BYTES}",
}


def within(seconds: float, work):
    """Run `work()` in a thread; fail (instead of hanging the suite) when it takes longer than `seconds`."""
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(value=work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked on a special file?)"
    return result["value"]


def test_listing_never_opens_special_files(special_folder: Path) -> None:
    found = within(10, lambda: list_image_files(special_folder))
    assert {p.name for p in found} >= set(SPECIAL_REASONS)


@pytest.mark.parametrize("workers", [0, 1])
def test_special_files_are_errors_and_the_job_finishes(artifact_dir: Path, special_folder: Path, tmp_path: Path,
                                                      workers: int) -> None:
    output = tmp_path / "out"
    summary = within(120, lambda: run_extraction(config_for(artifact_dir, special_folder, output, workers=workers)))
    reasons = {Path(record.path).name: record.reason for record in read_errors(output)}
    for name, reason in SPECIAL_REASONS.items():
        assert reason in reasons[name], (name, reasons[name])
    assert set(reasons) == set(SPECIAL_REASONS)
    assert summary.rows == 60 and summary.errors == 4
    assert len(read_output(output)) == 60
    assert psutil.Process().memory_info().rss < 4 * 1024**3  # /dev/zero was never read


def write_slow_images(folder: Path, count: int) -> None:
    """`count` 640x480 noise PNGs (slow enough to decode that the job runs for a while)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8), "RGB").save(folder / "img_0000.png")
    for i in range(1, count):
        os.link(folder / "img_0000.png", folder / f"img_{i:04d}.png")  # hard links: distinct paths, one file


def kill_leftovers(started: subprocess.Popen, family) -> None:
    """End a test's process and every process seen under it, even those already adopted by PID 1."""
    if started.poll() is None:
        started.kill()
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.mark.slow
def test_sigkill_of_the_job_ends_its_decoding_workers(artifact_dir: Path, tmp_path: Path) -> None:
    write_slow_images(tmp_path / "in", 400)
    command = [sys.executable, "-m", "cli", "extract", str(artifact_dir), "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out"), "--workers", "1", "--shard-size", "8", "--batch-size", "4",
               "--no-progress"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[psutil.Process] = []
    try:
        parent = psutil.Process(job.pid)
        deadline = time.monotonic() + 120
        while not parent.children(recursive=True) or not (tmp_path / "out" / shard_name(0)).exists():
            assert job.poll() is None, "the job ended before its workers could be seen"
            assert time.monotonic() < deadline, "no decoding worker and no shard after 120 s"
            time.sleep(0.1)
        workers = parent.children(recursive=True)
        job.kill()
        job.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"decoding workers still alive 10 s after the job was killed: {alive}"
    finally:
        kill_leftovers(job, workers)


def test_full_disk_is_one_error_line_and_resume_is_byte_identical(artifact_dir: Path, digits_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clean = tmp_path / "clean"
    run_extraction(config_for(artifact_dir, digits_dir, clean))
    output = tmp_path / "out"
    real_atomic_write = shards.atomic_write
    written: list[str] = []

    def fills_after_two_shards(path, write):
        if Path(path).suffix == ".parquet" and len(written) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) raises it: no file name
        real_atomic_write(path, write)
        written.append(Path(path).name)

    monkeypatch.setattr(shards, "atomic_write", fills_after_two_shards)
    arguments = ["extract", str(artifact_dir), "--input", str(digits_dir), "--output", str(output), "--workers", "0",
                 "--shard-size", "16", "--batch-size", "8", "--top-k", "3", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the output"), result.stderr
    assert str(output) in lines[0] and "No space left on device" in lines[0] and "ENOSPC" in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in output.glob("part-*.parquet")) == [shard_name(0), shard_name(1)]

    monkeypatch.setattr(shards, "atomic_write", real_atomic_write)  # space freed
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    for shard in range(4):
        assert (output / shard_name(shard)).read_bytes() == (clean / shard_name(shard)).read_bytes()
    assert (output / "_errors.jsonl").read_bytes() == (clean / "_errors.jsonl").read_bytes()


def test_an_unwritable_output_file_is_named(artifact_dir: Path, digits_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS / EACCES carry the file name: the message names the file, not just the folder."""
    from extraction.config import ExtractionError

    output = tmp_path / "out"

    def read_only(path, write):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(shards, "atomic_write", read_only)
    with pytest.raises(ExtractionError, match=r"cannot write the output .*part-00000\.parquet: Read-only file system \(EROFS\)"):
        run_extraction(config_for(artifact_dir, digits_dir, output))
