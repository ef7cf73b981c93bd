"""The embedded demo dataset: scikit-learn's handwritten digits written out as an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(output: str | Path, classes: int = 10, per_class: int | None = None) -> int:
    """Write scikit-learn's 8x8 digits (1,797 in all) as grayscale PNGs under `output/<digit>/`.

    `classes` and `per_class` take a smaller subset (for quick runs and tests); returns the image count.
    """
    from sklearn.datasets import load_digits

    output = Path(output)
    digits = load_digits()
    pixels = (digits.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
    written: dict[int, int] = {}
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        if target >= classes or (per_class is not None and written.get(target, 0) >= per_class):
            continue
        written[target] = written.get(target, 0) + 1
        folder = output / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"digit_{index:04d}.png")
    return sum(written.values())
