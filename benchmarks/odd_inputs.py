"""The extraction job's error path against its good path: N empty files (each one an error record) and N small
valid PNGs (each one a row), same folder shape, same job options; listing and whole-job figures.

    python benchmarks/odd_inputs.py --quick          # 2,000 of each
    python benchmarks/odd_inputs.py                  # 10,000 of each
    python benchmarks/odd_inputs.py --artifact DIR   # your model instead of the default

Without --artifact it exports efficientnet_lite0 with random weights at 32 px (the model's cost is not what is
measured here) to a temporary folder. Printed per case: wall seconds to list the inputs, wall seconds of the whole
job (`run_extraction`: listing, model load, decoding, inference, writing), CPU seconds of this process and of its
decoding workers, and ms of wall time per file. Runs against whichever code is on PYTHONPATH, so the same script
measures before and after a change.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import export_model, machine, table  # noqa: E402


def write_empty_files(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"img_{i:06d}.jpg").touch()


def write_small_pngs(folder: Path, count: int) -> None:
    """`count` hard links of one 64x64 noise PNG: distinct paths, one file on disk."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), "RGB").save(folder / "img_000000.png")
    for i in range(1, count):
        os.link(folder / "img_000000.png", folder / f"img_{i:06d}.png")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(name: str, artifact: Path, inputs: Path, output: Path, workers: int) -> list[object]:
    from extraction.config import ExtractionConfig
    from extraction.inputs import list_inputs
    from extraction.job import run_extraction

    started = time.perf_counter()
    count = len(list_inputs(inputs).paths)
    listing_s = time.perf_counter() - started
    config = ExtractionConfig(artifact=artifact, input=inputs, output=output, workers=workers, show_progress=False)
    cpu_self, cpu_children, started = time.process_time(), children_cpu(), time.perf_counter()
    summary = run_extraction(config)
    wall = time.perf_counter() - started
    return [name, count, summary.rows, summary.errors, f"{listing_s:.2f}", f"{wall:.2f}",
            f"{time.process_time() - cpu_self:.2f}", f"{children_cpu() - cpu_children:.2f}",
            f"{1000 * wall / count:.2f}"]  # fmt: skip


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 files per case instead of 10,000.")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="Decoding workers (the CLI's default: 2).")
    parser.add_argument("--artifact", type=Path, default=None)
    args = parser.parse_args(argv)
    count = args.count or (2_000 if args.quick else 10_000)
    scratch = Path(tempfile.mkdtemp(prefix="odd-inputs-"))
    try:
        artifact = args.artifact or export_model(scratch, "efficientnet_lite0", "none", image_size=32)
        write_empty_files(scratch / "empty", count)
        write_small_pngs(scratch / "good", count)
        rows = [
            run_case("empty files (errors)", artifact, scratch / "empty", scratch / "out-empty", args.workers),
            run_case("64x64 PNGs (rows)", artifact, scratch / "good", scratch / "out-good", args.workers),
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"# {machine()}; {args.workers} decoding workers")
    print(table(["case", "files", "rows", "errors", "listing s", "job wall s", "CPU s (job)", "CPU s (workers)",
                 "ms/file"], rows))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
