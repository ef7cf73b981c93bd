"""Decoding stage of the extraction job: image paths -> the network's input batch, or a reason per image.

`ImageDecoder` is a plain callable over column batches (`dict[str, np.ndarray]`), so the local engine runs
it in DataLoader worker processes and the Ray engine runs it as a `map_batches` stage. It uses the one
preprocessing definition (`models.decoding.load_image` + `preprocess_batch` with the artifact's
`Preprocessing`, exactly what `Predictor.preprocess` does); a file that cannot be decoded becomes an
error string in its row instead of an exception, so one bad file never stops the job.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from models.decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image

from models.image_files import utf8_display
from models.preprocessing import Preprocessing, preprocess_batch


class ImageDecoder:
    """`{"index", "path"}` -> `{"index", "path", "pixels" (N,3,H,W float32), "error" ("" when decoded)}`."""

    def __init__(self, preprocessing: Preprocessing | dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.preprocessing = Preprocessing.model_validate(preprocessing)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        given = np.asarray(batch["path"], dtype=object).reshape(-1)  # str, or bytes from the Ray engine
        paths = [os.fsdecode(p) for p in given]
        size = self.preprocessing.image_size
        pixels = np.zeros((len(paths), 3, size, size), dtype=np.float32)
        errors = [""] * len(paths)
        images: list[Image.Image] = []
        positions: list[int] = []
        for position, path in enumerate(paths):
            try:
                images.append(load_image(path, self.max_pixels, preprocessing=self.preprocessing))
                positions.append(position)
            except ImageDecodeError as exc:
                errors[position] = utf8_display(str(exc))  # a message may quote a name that is not UTF-8
            except Exception as exc:  # noqa: BLE001 - a single unreadable file must not stop the job
                errors[position] = utf8_display(f"{type(exc).__name__}: {exc}")
        if images:
            try:
                pixels[positions] = preprocess_batch(images, self.preprocessing)
            except Exception:  # noqa: BLE001 - find the image(s) the transform refuses, keep the rest
                for position, image in zip(positions, images):
                    try:
                        pixels[position] = preprocess_batch([image], self.preprocessing)[0]
                    except Exception as exc:  # noqa: BLE001
                        errors[position] = f"preprocessing failed: {type(exc).__name__}: {exc}"
        return {
            "index": np.asarray(batch["index"], dtype=np.int64).reshape(-1),
            "path": given,
            "pixels": pixels,
            "error": np.asarray(errors, dtype=object),
        }


def decode_batch(
    batch: dict[str, np.ndarray], *, preprocessing: Preprocessing | dict, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Function form of `ImageDecoder` (Ray runs a function stage as stateless tasks)."""
    return ImageDecoder(preprocessing, max_pixels)(batch)
