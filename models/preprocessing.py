"""The one preprocessing definition shared by training, export, the service and the batch job.

`Preprocessing` is plain data (it is stored in every artifact's manifest); the functions below turn it
into the transforms that training and inference use, so no other module resizes or normalises images.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from torchvision.transforms import v2 as T

DEFAULT_MAX_PIXELS = 40_000_000
"""Images above this many pixels are refused before decoding (decompression-bomb guard)."""

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; the message names the reason."""


class Preprocessing(BaseModel):
    """How raw images become the network's input tensor."""

    model_config = ConfigDict(frozen=True)

    image_size: int = Field(gt=0, description="Side of the square network input, in pixels.")
    resize: Literal["squash", "shorter_side_crop"] = Field(
        description="'squash': resize straight to image_size x image_size; "
        "'shorter_side_crop': resize the shorter side to image_size / crop_pct, then center-crop."
    )
    crop_pct: float = Field(default=1.0, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def with_image_size(self, image_size: int) -> "Preprocessing":
        return self.model_copy(update={"image_size": image_size})


def _interpolation(p: Preprocessing) -> T.InterpolationMode:
    return T.InterpolationMode.BICUBIC if p.interpolation == "bicubic" else T.InterpolationMode.BILINEAR


def normalized_chw(image: Image.Image, p: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """RGB PIL image -> float32 CHW array scaled to [0, 1] and normalised by the mean and std.

    The one normalisation: training (through `ToNormalizedTensor`) and every runtime use it. Plain numpy,
    because torch's elementwise kernels on single images cost tens of ms each on a busy 2-core machine
    (intra-op thread hand-offs; docs/BENCHMARKS.md, Service)."""
    if out is None:
        out = np.empty((3, image.height, image.width), dtype=np.float32)
    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float32)
    np.multiply(pixels.transpose(2, 0, 1), np.float32(1 / 255), out=out)
    out -= np.asarray(p.mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(p.std, dtype=np.float32)[:, None, None]
    return out


class ToNormalizedTensor:
    """Transform step: RGB PIL image -> normalised float32 CHW tensor (see `normalized_chw`)."""

    def __init__(self, p: Preprocessing) -> None:
        self.preprocessing = p

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(normalized_chw(image, self.preprocessing))


def eval_geometry(p: Preprocessing) -> T.Compose:
    """The deterministic resize (and crop) of inference, on PIL images."""
    interpolation = _interpolation(p)
    if p.resize == "squash":
        return T.Compose([T.Resize((p.image_size, p.image_size), interpolation=interpolation)])
    resize_size = int(round(p.image_size / p.crop_pct))
    return T.Compose([T.Resize(resize_size, interpolation=interpolation), T.CenterCrop(p.image_size)])


def eval_transform(p: Preprocessing) -> T.Compose:
    """Deterministic PIL image -> float32 CHW tensor used for validation, export and inference."""
    return T.Compose([eval_geometry(p), ToNormalizedTensor(p)])


def train_transform(p: Preprocessing, horizontal_flip: bool = True, min_scale: float = 0.5) -> T.Compose:
    """Training augmentation: random resized crop (and optional flip) around the same normalisation."""
    augment: list[T.Transform] = [
        T.RandomResizedCrop(p.image_size, scale=(min_scale, 1.0), interpolation=_interpolation(p), antialias=True)
    ]
    if horizontal_flip:
        augment.append(T.RandomHorizontalFlip())
    return T.Compose(augment + [ToNormalizedTensor(p)])


def load_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes or a file into an RGB PIL image, or raise ImageDecodeError saying why.

    The pixel limit is checked from the header, before any pixel is decoded. EXIF orientation is applied,
    grayscale/CMYK/palette images are converted, and transparency is composited onto white. Multi-frame
    images (animated GIF, multi-page TIFF) use their first frame.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("empty file: zero bytes received")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
    try:
        with Image.open(stream) as image:
            if image.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {image.format!r}")
            width, height = image.size
            if width == 0 or height == 0:
                raise ImageDecodeError(f"zero-size image ({width}x{height})")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            image.seek(0)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        declared = _declared_size(source if isinstance(source, bytes) else Path(source).read_bytes()[:32])
        if declared is not None and 0 in declared:
            raise ImageDecodeError(f"zero-size image ({declared[0]}x{declared[1]})") from None
        raise ImageDecodeError("not an image: the bytes match no supported image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {source}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def _declared_size(header: bytes) -> tuple[int, int] | None:
    """Width and height a PNG or GIF header declares; Pillow refuses to identify 0-pixel images at all."""
    if header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR" and len(header) >= 24:
        return struct.unpack(">II", header[16:24])
    if header[:6] in (b"GIF87a", b"GIF89a") and len(header) >= 10:
        return struct.unpack("<HH", header[6:10])
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_batch(images: Sequence[Image.Image], p: Preprocessing) -> np.ndarray:
    """RGB PIL images -> contiguous float32 NCHW array ready for any runtime: `eval_transform`'s values,
    each image written straight into the batch."""
    batch = np.empty((len(images), 3, p.image_size, p.image_size), dtype=np.float32)
    geometry = eval_geometry(p)
    for out, image in zip(batch, images):
        normalized_chw(geometry(image), p, out=out)
    return batch
