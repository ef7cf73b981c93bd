"""End-to-end throughput of the extraction job: JPEG files on disk -> Parquet shards, in images/s.

    python benchmarks/extraction.py --quick                      # 256 images, local engine
    python benchmarks/extraction.py                              # 2048 images
    python benchmarks/extraction.py --engine ray --workers 0     # the same job on a local Ray
    python benchmarks/extraction.py --artifact path/to/artifact  # your model instead of the default

Without --artifact it exports efficientnet_lite0 (ImageNet weights, 224 px, 10-class head; the head's
weights do not change the cost) to a temporary folder. Images are synthetic 320x240 JPEGs (smooth
gradients + noise, so they decode like photos). The figure is wall time from `run_extraction` start to
the summary, so it includes listing, model loading, decoding, inference and writing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(count):
        colour = rng.uniform(0, 255, size=(3, 1, 1))
        angle = rng.uniform(0, np.pi)
        ramp = (np.cos(angle) * x + np.sin(angle) * y) / 400.0
        pixels = colour * (0.5 + 0.5 * np.sin(ramp * rng.uniform(2, 12))) + rng.normal(0, 12, size=(3, 240, 320))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0))
        image.save(folder / f"img_{i:06d}.jpg", quality=90)


def export_default_artifact(folder: Path) -> Path:
    import torch

    from models.network import build_network
    from models.registry import get_spec
    from training.export import export_artifact

    spec = get_spec("efficientnet_lite0")
    torch.manual_seed(0)
    model = build_network(spec.name, num_classes=10, weights="imagenet").eval()
    size = spec.preprocessing.image_size
    export_artifact(
        model,
        labels=[f"class_{i}" for i in range(10)],
        backbone=spec.name,
        preprocessing=spec.preprocessing,
        parity_batch=torch.randn(4, 3, size, size),
        output=folder / "artifact",
        name="benchmark",
        version="benchmark",
    )
    return folder / "artifact"


def versions() -> str:
    names = ("torch", "onnxruntime", "onnxruntime-gpu", "pyarrow", "ray", "pillow")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join([f"python {platform.python_version()}"] + found)


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

    from service.extraction import run_extraction
    from service.extraction_schema import ExtractionConfig, RayOptions

    count = args.images or (256 if args.quick else 2048)
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as scratch:
        scratch = Path(scratch)
        artifact = args.artifact or export_default_artifact(scratch)
        write_images(scratch / "images", count)
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
