"""End-to-end throughput of the extraction job: JPEG files on disk -> Parquet shards, in images/s.

    python benchmarks/extraction_speed.py --quick                      # 256 images, local engine
    python benchmarks/extraction_speed.py                              # 2048 images
    python benchmarks/extraction_speed.py --engine ray --workers 0     # the same job on a local Ray
    python benchmarks/extraction_speed.py --artifact path/to/artifact  # your model instead of the default

Without --artifact it exports efficientnet_lite0 (ImageNet weights, 224 px, 10-class head; the head's
weights do not change the cost) to a temporary folder. Images are synthetic 320x240 JPEGs (smooth
gradients + noise, so they decode like photos). The figure is wall time from `run_extraction` start to
the summary, so it includes listing, model loading, decoding, inference and writing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import export_model, versions, write_jpegs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 images instead of 2048.")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Decoding workers (several: one run each).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--ray-concurrency", type=int, default=1)
    args = parser.parse_args()

    from extraction.config import ExtractionConfig, RayOptions
    from extraction.job import run_extraction

    count = args.images or (256 if args.quick else 2048)
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as scratch:
        scratch = Path(scratch)
        artifact = args.artifact or export_model(scratch, "efficientnet_lite0", "imagenet")
        write_jpegs(scratch / "images", count)
        print(f"# {count} JPEG images 320x240, artifact {artifact}, {os.cpu_count()} CPU cores; {versions()}")
        print("| engine | workers | batch | images | images/s | wall s |")
        print("|---|---|---|---|---|---|")
        for workers in args.workers:
            output = scratch / f"out-{args.engine}-{workers}"
            config = ExtractionConfig(
                artifact=artifact,
                input=scratch / "images",
                output=output,
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                workers=workers,
                engine=args.engine,
                ray=RayOptions(concurrency=args.ray_concurrency, local_num_cpus=os.cpu_count()),
                show_progress=False,
            )
            start = time.perf_counter()
            summary = run_extraction(config)
            wall = time.perf_counter() - start
            print(
                f"| {args.engine} | {workers} | {args.batch_size} | {summary.rows} | {summary.rows / wall:.1f} | {wall:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
