"""`transfer-serve audit` measured: the near-duplicate threshold and the time for a large set (precision and recall
on planted problems: tests/test_audit.py's planted sets, figures in docs/AUDIT.md).

    python -m benchmarks.audit threshold --data ../shared/datasets/hymenoptera     # cosine of near copies vs strangers
    python -m benchmarks.audit scale --images 10000                                 # wall time of a whole audit

Prints its figures with the machine, versions and load; docs/AUDIT.md records them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import machine, versions
from models.decoding import load_image
from extraction.embed import embed_paths
from training.audit.embedder import embedder_artifact
from training.audit.run import AuditConfig, run_audit
from training.data import discover_images


def near_copy(source: Path, target: Path, rng: np.random.Generator) -> None:
    """What a near duplicate usually is: the same photo resized (70-90%), cropped by a few percent and
    re-encoded as JPEG at quality 60-85."""
    image = load_image(source)
    w, h = image.size
    crop = rng.uniform(0.0, 0.04)
    image = image.crop((int(w * crop), int(h * crop), int(w * (1 - crop)), int(h * (1 - crop))))
    scale = rng.uniform(0.7, 0.9)
    image = image.resize((max(8, int(image.width * scale)), max(8, int(image.height * scale))))
    image.save(target, format="JPEG", quality=int(rng.integers(60, 86)))


def threshold(args: argparse.Namespace, work: Path) -> None:
    records = [r for r in discover_images(args.data)]
    rng = np.random.default_rng(0)
    copies = []
    for n, record in enumerate(records):
        target = work / f"copy-{n}.jpg"
        near_copy(record.path, target, rng)
        copies.append(target)
    artifact = embedder_artifact(work / "embedder", "efficientnet_lite0", args.image_size)
    unit = embed_paths([r.path for r in records] + copies, artifact, work / "embeddings", show_progress=False).unit
    n = len(records)
    originals, near = unit[:n], unit[n:]
    positive = np.einsum("nd,nd->n", originals, near)
    similarity = originals @ originals.T
    np.fill_diagonal(similarity, -1)
    stranger = similarity.max(axis=1)
    print(f"{n} images of {args.data} at {args.image_size or 224} px; {machine()}; {versions()}")
    print("near copy vs original: quantiles 1/5/50%:", np.round(np.quantile(positive, [0.01, 0.05, 0.5]), 4))
    print("nearest other image: quantiles 50/95/99/100%:", np.round(np.quantile(stranger, [0.5, 0.95, 0.99, 1.0]), 4))
    for t in (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98):
        print(f"threshold {t:.2f}: recall of near copies {np.mean(positive >= t):.3f}, "
              f"images with a stranger above it {np.mean(stranger >= t):.3f}")


def scale(args: argparse.Namespace, work: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    data = work / "data"
    for n in range(args.images):
        k = n % len(digits.images)
        pixels = np.kron(digits.images[k] / 16.0, np.ones((4, 4))) * 200 + rng.normal(0, 20, (32, 32))
        folder = data / str(digits.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L").save(folder / f"{n:05d}.png")
    started = time.perf_counter()
    report = run_audit(AuditConfig(data=data, output=work / "audit", image_size=args.image_size, show_progress=True), embed_paths)
    elapsed = time.perf_counter() - started
    print(f"{args.images} images (32x32 PNG, noisy digits) at {args.image_size or 224} px: audit {elapsed:.0f} s "
          f"wall, including ~20 s exporting the embedder; {machine()}; {versions()}")
    print(report.summary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["threshold", "scale"])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/hymenoptera"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="audit-benchmark-"))
    try:
        {"threshold": threshold, "scale": scale}[args.what](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
