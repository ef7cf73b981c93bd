"""The batch job on odd paths (issue 21, item 6): file names no text format expects (a newline, bytes that are not
UTF-8, Unicode line separators, control characters), good images and broken files alike, and a folder nested past
PATH_MAX. The job finishes, records every path losslessly, and resumes; the listing never recurses."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from extraction.job import read_errors, run_extraction
from extraction.shards import NOT_UTF8_REASON
from models.image_files import scan_image_files
from test_extraction import config_for, read_output

ODD_NAMES: dict[str, bytes] = {
    "newline": b"line\nbreak",
    "carriage return": b"carriage\rreturn",
    "latin-1 byte": b"caf\xe9",
    "invalid UTF-8": b"\xff\xfe\xfd",
    "lone continuation byte": b"x\x80y",
    "unicode line separator": "para\u2028graph".encode(),
    "NEL": "next\u0085line".encode(),
    "record separator": b"rec\x1esep",
    "tab and spaces": b" tab\tand spaces ",
    "quote and backslash": b'quo"te\\slash',
    "long": b"n" * 240,
}


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture()
def odd_folder(digits_dir: Path, tmp_path: Path) -> Path:
    """For every odd name: a good PNG (`<name>.png`) and a broken file (`<name>-broken.jpg`), plus one plain image."""
    folder = tmp_path / "in"
    folder.mkdir()
    image = sorted((digits_dir / "1").glob("*.png"))[0]
    shutil.copy(image, folder / "plain.png")
    for raw in ODD_NAMES.values():
        target = os.path.join(os.fsencode(folder), raw)
        shutil.copy(image, target + b".png")
        with open(target + b"-broken.jpg", "wb") as handle:
            handle.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_odd_names_are_rows_or_lossless_errors_and_the_job_resumes(artifact_dir: Path, odd_folder: Path,
                                                                   tmp_path: Path) -> None:
    output = tmp_path / "out"
    summary = run_extraction(config_for(artifact_dir, odd_folder, output))
    utf8 = {case for case, raw in ODD_NAMES.items() if _is_utf8(raw)}
    assert summary.images == 1 + 2 * len(ODD_NAMES)
    assert summary.rows == 1 + len(utf8)
    rows = {os.path.basename(path) for path in read_output(output).column("path").to_pylist()}
    assert rows == {"plain.png"} | {ODD_NAMES[case].decode() + ".png" for case in utf8}

    records = read_errors(output)
    assert len(records) == summary.errors == 2 * len(ODD_NAMES) - len(utf8)
    recorded = {os.fsencode(os.path.basename(record.os_path)): record for record in records}
    for case, raw in ODD_NAMES.items():
        assert raw + b"-broken.jpg" in recorded, case  # the exact bytes come back
        if not _is_utf8(raw):
            record = recorded[raw + b".png"]
            assert record.reason == NOT_UTF8_REASON and record.path_bytes_hex is not None
            assert os.path.exists(record.os_path)
    for line in (output / "_errors.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
        json.loads(line)  # every line is one valid JSON document

    before = {p.name: p.read_bytes() for p in output.glob("part-*.parquet")}
    (output / "part-00000.parquet").unlink()  # a killed run: resume rewrites the same shard
    again = run_extraction(config_for(artifact_dir, odd_folder, output))
    assert again.shards_written == 1 and again.rows == summary.rows and again.errors == summary.errors
    assert {p.name: p.read_bytes() for p in output.glob("part-*.parquet")} == before


def test_odd_names_in_a_csv_manifest(artifact_dir: Path, odd_folder: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "inputs.csv"
    with open(manifest, "wb") as handle:  # the CSV holds the raw bytes, newline names quoted
        handle.write(b"path\n")
        for entry in sorted(os.listdir(os.fsencode(odd_folder))):
            handle.write(b'"' + os.path.join(os.fsencode(odd_folder), entry).replace(b'"', b'""') + b'"\n')
    result = CliRunner().invoke(app, ["extract", str(artifact_dir), "--input", str(manifest), "--output",
                                      str(tmp_path / "out"), "--workers", "0", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["images"] == 1 + 2 * len(ODD_NAMES)


PATH_MAX = os.pathconf("/", "PC_PATH_MAX")


def _nest(root: Path, depth: int) -> None:
    """`depth` nested folders `d` under `root`, made through directory descriptors (their paths exceed PATH_MAX),
    with a broken image at 1/3 depth (reachable) and one at the bottom (past PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level in (depth // 3, depth - 1):
                with open(os.open(f"at-{level}.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as handle:
                    handle.write(b"not a png")
    finally:
        os.close(fd)


def _unnest(root: Path) -> None:
    """Remove what `_nest` made with short paths only, top down: empty `root/d` of files, lift its child up."""
    top = root / "d"
    while top.exists():
        for entry in os.listdir(top):
            if entry != "d":
                os.unlink(top / entry)
        if (top / "d").exists():
            os.rename(top / "d", root / "next")
            os.rmdir(top)
            os.rename(root / "next", top)
        else:
            os.rmdir(top)


@pytest.fixture()
def deep_folder(tmp_path: Path):
    root = tmp_path / "deep"
    root.mkdir()
    depth = PATH_MAX // 2 + 200  # "d/" per level: the bottom is past PATH_MAX, and past Python's recursion limit
    _nest(root, depth)
    try:
        yield root, depth
    finally:
        _unnest(root)


def test_a_folder_nested_past_path_max_is_walked_without_recursion(deep_folder, artifact_dir: Path,
                                                                   tmp_path: Path) -> None:
    root, depth = deep_folder
    listing = scan_image_files(root)
    assert [os.path.basename(path) for path in listing.files] == [f"at-{depth // 3}.png"]
    assert len(listing.unlisted) == 1
    (folder, reason), = listing.unlisted.items()
    assert "File name too long" in reason and len(os.fsencode(folder)) >= PATH_MAX

    output = tmp_path / "out"
    summary = run_extraction(config_for(artifact_dir, root, output))
    assert summary.images == 2 and summary.errors == 2 and summary.rows == 0
    reasons = sorted(record.reason for record in read_errors(output))
    assert any("folder could not be listed: File name too long" in reason for reason in reasons), reasons
