"""End-to-end throughput of the extraction job: JPEG files on disk -> Parquet shards, in images/s.

    python benchmarks/extraction_speed.py --quick                      # 256 images, local engine
    python benchmarks/extraction_speed.py                              # 2048 images
    python benchmarks/extraction_speed.py --engine ray --workers 0     # the same job on a local Ray
    python benchmarks/extraction_speed.py --artifact path/to/artifact  # your model instead of the default
    python benchmarks/extraction_speed.py --photos-12mp                # 96 12 MP JPEGs, decode full vs reduced

Without --artifact it exports efficientnet_lite0 (ImageNet weights, 224 px, 10-class head; the head's
weights do not change the cost) to a temporary folder. Images are synthetic 320x240 JPEGs (smooth
gradients + noise, so they decode like photos). The figure is wall time from `run_extraction` start to
the summary, so it includes listing, model loading, decoding, inference and writing.

`--photos-12mp`: the images are 12-megapixel JPEGs (4032x3024, ~3 MB: `common.photo_12mp_payloads`, 8
distinct photos cycled over the files) and every worker count runs twice in one invocation, on copies of the
same artifact whose manifest's `preprocessing.decode` is "full" (before) and "reduced" (after). Printed
beside them: the raw runtime at the job's batch size (pre-decoded inputs, this process, measured before and
after the jobs), the per-image decode time of each path on one thread (without `--quick`, also of each JPEG
DCT scale), and the job's CPU seconds per image (this process + its decoding workers). Default batch 16 (a 12 MP batch of 64 is seconds of decoding per
worker). `--quick` makes it 2 images (2 distinct photos).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DCT_HEADERS, DECODE_HEADERS, cpu_per_call, cpu_seconds, dct_scale_rows, decode_rows, export_model, machine, photo_12mp_payloads, photo_12mp_source, table,
    versions, with_decode, write_jpegs, write_payloads,
)


def raw_images_per_s(artifact: Path, batch_size: int, min_seconds: float) -> tuple[float, float]:
    """The job's default runtime in this process at `batch_size`, pre-decoded inputs: (images/s, CPU seconds per image)."""
    from models.inference import InferenceOptions
    from models.predictor import Predictor

    predictor = Predictor.from_artifact(artifact, InferenceOptions(device="cpu"))
    size = predictor.manifest.preprocessing.image_size
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
    wall, cpu = cpu_per_call(lambda: predictor.predict_batch(batch), 3, min_seconds)
    return batch_size / wall, cpu / batch_size


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 images instead of 2048 (12 MP: 2 instead of 96).")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Decoding workers (several: one run each).")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (12 MP: 16)")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--ray-concurrency", type=int, default=1)
    parser.add_argument("--photos-12mp", action="store_true", help="12 MP JPEGs, decode full (before) vs reduced (after)")
    args = parser.parse_args(argv)

    from extraction.config import ExtractionConfig, RayOptions
    from extraction.job import run_extraction

    if args.photos_12mp:
        count = args.images or (2 if args.quick else 96)
        args.batch_size = args.batch_size or 16
    else:
        count = args.images or (256 if args.quick else 2048)
        args.batch_size = args.batch_size or 64
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as scratch:
        scratch = Path(scratch)
        artifact = args.artifact or export_model(scratch, "efficientnet_lite0", "imagenet")
        if args.photos_12mp:
            payloads = photo_12mp_payloads(min(count, 8))
            write_payloads(scratch / "images", payloads, count)
            paths = {"full (before)": with_decode(artifact, "full", scratch / "before"),
                     "reduced (after)": with_decode(artifact, "reduced", scratch / "after")}
            print(f"# {count} JPEG images 4032x3024 ({len(payloads)} distinct: {photo_12mp_source()}, "
                  f"{np.mean([len(p) for p in payloads]) / 1e6:.1f} MB mean), artifact {artifact}; {machine()}")
            min_seconds = 1.0 if args.quick else 5.0
            raw = [raw_images_per_s(artifact, args.batch_size, min_seconds)]
            print(table(DECODE_HEADERS, decode_rows(payloads, paths, 0.5 if args.quick else 3.0)), flush=True)
            if not args.quick:
                print(table(DCT_HEADERS, dct_scale_rows(payloads, 3.0)), flush=True)
        else:
            write_jpegs(scratch / "images", count)
            paths = {"as exported": artifact}
            print(f"# {count} JPEG images 320x240, artifact {artifact}, {os.cpu_count()} CPU cores; {versions()}")
            print("| engine | workers | batch | images | images/s | wall s |")
            print("|---|---|---|---|---|---|")
        for workers in args.workers:
            for label, path in paths.items():
                output = scratch / f"out-{args.engine}-{workers}-{len(rows)}"
                config = ExtractionConfig(
                    artifact=path,
                    input=scratch / "images",
                    output=output,
                    batch_size=args.batch_size,
                    shard_size=args.shard_size,
                    workers=workers,
                    engine=args.engine,
                    ray=RayOptions(concurrency=args.ray_concurrency, local_num_cpus=os.cpu_count()),
                    show_progress=False,
                )
                cpu_before = cpu_seconds()
                start = time.perf_counter()
                summary = run_extraction(config)
                wall = time.perf_counter() - start
                cpu_after = cpu_seconds()
                row = [args.engine, workers, args.batch_size, summary.rows, summary.rows / wall, wall,
                       (sum(cpu_after) - sum(cpu_before)) / max(summary.rows, 1)]
                if args.photos_12mp:
                    rows.append([label, *row])
                    print(f"# {label}, {workers} workers: {row[4]:.1f} images/s", file=sys.stderr, flush=True)
                else:
                    rows.append(row)
                    print(f"| {args.engine} | {workers} | {args.batch_size} | {summary.rows} | {summary.rows / wall:.1f} | "
                          f"{wall:.1f} |", flush=True)
        if args.photos_12mp:
            raw.append(raw_images_per_s(artifact, args.batch_size, min_seconds))
            reference = float(np.mean([r[0] for r in raw]))
            print(f"raw runtime at batch {args.batch_size}, pre-decoded: {raw[0][0]:.1f} images/s before the jobs, "
                  f"{raw[1][0]:.1f} after (mean {reference:.1f}); CPU ms/image "
                  f"{raw[0][1] * 1e3:.1f} and {raw[1][1] * 1e3:.1f}; {machine()}")
            print(table(["decode", "engine", "workers", "batch", "images", "images/s", "% of raw", "wall s",
                         "CPU s/image (job + workers)"],
                        [[label, engine, workers, batch, n, f"{rate:.1f}", f"{100 * rate / reference:.0f}%", f"{wall:.1f}",
                          f"{cpu:.3f}"] for label, engine, workers, batch, n, rate, wall, cpu in rows]))
    return rows


if __name__ == "__main__":
    main()
