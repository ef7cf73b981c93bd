"""CPU cost of the resize (+ centre crop) step per image, the product's against torchvision's two steps, side by side.

    python benchmarks/preprocessing_speed.py            # ~1 minute
    python benchmarks/preprocessing_speed.py --quick    # seconds

For each image shape (the synthetic 320x240 JPEGs of the extraction and serving benchmarks, both orientations, and
the 1008x756 a 12 MP JPEG is decoded to by DCT scaling) and each preprocessing the registry uses (efficientnet_lite0's
resize 256 + centre crop 224 bicubic, and the squash to 224x224 bilinear that lite0 artifacts used until
2026-12-04), one thread, best of `--rounds`:
- `torchvision two steps`: `Resize(256)` then `CenterCrop(224)` (what `models.preprocessing.eval_geometry` ran
  until 2026-12-06);
- `product`: `models.preprocessing.eval_geometry` now (for the crop: one resampling of the crop's source box);
- the largest pixel difference between the two (grey levels, on photo-like content).
For the squash both columns run the same code: their ratio shows the noise of the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

from models.preprocessing import Preprocessing, eval_geometry, interpolation_mode  # noqa: E402

SHAPES = [(320, 240), (240, 320), (1008, 756)]
CROP = Preprocessing(image_size=224, resize="shorter_side_crop", crop_pct=0.875, interpolation="bicubic",
                     mean=(0.5,) * 3, std=(0.5,) * 3)
SQUASH = CROP.model_copy(update={"resize": "squash", "crop_pct": 1.0, "interpolation": "bilinear"})


def photo_like(width: int, height: int, count: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random scenes with grain: coarse noise upscaled, plus fine noise (photos are mostly low-frequency)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
        images.append(Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)))
    return images


def ms_per_image(transforms: list, images: list[Image.Image], rounds: int) -> list[float]:
    """Best time per image of each transform, the transforms alternated round by round (so a slower moment of a
    shared machine does not fall on one of them only)."""
    best = [float("inf")] * len(transforms)
    for _ in range(rounds):
        for i, transform in enumerate(transforms):
            started = time.perf_counter()
            for image in images:
                transform(image)
            best[i] = min(best[i], time.perf_counter() - started)
    return [1000 * b / len(images) for b in best]


def main(argv: list[str] | None = None) -> list[list[object]]:
    from torchvision.transforms import v2 as T

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images a shape, 2 rounds")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    count, rounds = (8, 2) if args.quick else (64, args.rounds)
    print(f"# resize (+ crop) per image, 1 thread, best of {rounds} rounds of {count} images; {machine()}")
    rows: list[list[object]] = []
    for width, height in SHAPES:
        images = photo_like(width, height, count)
        for name, pre in (("crop 256 -> 224 bicubic", CROP), ("squash 224 bilinear", SQUASH)):
            if pre.resize == "squash":
                reference = T.Resize((pre.image_size, pre.image_size), interpolation=interpolation_mode(pre))
            else:
                reference = T.Compose([T.Resize(int(round(pre.image_size / pre.crop_pct)),
                                                interpolation=interpolation_mode(pre)), T.CenterCrop(pre.image_size)])
            product = eval_geometry(pre)
            before, after = ms_per_image([reference, product], images, rounds)
            difference = max(int(np.abs(np.asarray(reference(i), np.int16) - np.asarray(product(i), np.int16)).max())
                             for i in images)
            rows.append([f"{width}x{height}", name, f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}",
                         difference])
    print(table(["image", "preprocessing", "torchvision two steps ms", "product ms", "product / two steps",
                 "max difference (levels)"], rows))
    return rows


if __name__ == "__main__":
    main()
