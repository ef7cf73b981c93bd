"""The one preprocessing definition shared by training, export, the service and the batch job.

`Preprocessing` is plain data (it is stored in every artifact's manifest); the functions below turn it
into the transforms that training and inference use, so no other module resizes or normalises images.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torchvision.transforms import v2 as T


MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024
"""Bounds of the network input side: every registered backbone trains and serves between them, and a manifest
naming a larger side would make every blank warm-up batch and every decoded request grow with its square."""

MIN_CROP_PCT = 0.5
"""A smaller crop would resize each image's shorter side to more than twice `image_size` before cropping."""

ChannelMean = Annotated[float, Field(ge=-10.0, le=10.0, allow_inf_nan=False)]
ChannelStd = Annotated[float, Field(ge=1e-3, le=10.0, allow_inf_nan=False)]
"""Finite and bounded: a NaN mean or a zero std turns every pixel into NaN or infinity, and the service would
answer plausible-looking 200s with null probabilities (pixels are in [0, 1], so real statistics lie well inside)."""


class Preprocessing(BaseModel):
    """How raw images become the network's input tensor."""

    model_config = ConfigDict(frozen=True)

    image_size: int = Field(
        ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, description="Side of the square network input, in pixels."
    )
    resize: Literal["squash", "shorter_side_crop"] = Field(
        description="'squash': resize straight to image_size x image_size; "
        "'shorter_side_crop': resize the shorter side to image_size / crop_pct, then center-crop."
    )
    crop_pct: float = Field(default=1.0, ge=MIN_CROP_PCT, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[ChannelMean, ChannelMean, ChannelMean]
    std: tuple[ChannelStd, ChannelStd, ChannelStd]
    decode: Literal["full", "reduced"] = Field(
        default="full",
        description="'reduced': large images are decoded at reduced size (JPEG DCT scaling, box reduction) to at "
        "least twice the resize step's side, then resized as usual (artifacts trained since 2026-11-27); "
        "'full': every pixel is decoded first (older artifacts). See models/decoding.py.",
    )

    def with_image_size(self, image_size: int) -> "Preprocessing":
        return self.model_copy(update={"image_size": image_size})


def interpolation_mode(p: Preprocessing) -> T.InterpolationMode:
    """The preprocessing's interpolation for torchvision's transforms (training's random resized crops too)."""
    return T.InterpolationMode.BICUBIC if p.interpolation == "bicubic" else T.InterpolationMode.BILINEAR


def pil_interpolation(p: Preprocessing) -> Image.Resampling:
    """The same interpolation as Pillow's resampling filter."""
    return Image.Resampling.BICUBIC if p.interpolation == "bicubic" else Image.Resampling.BILINEAR


def normalized_chw(image: Image.Image, p: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """RGB PIL image -> float32 CHW array scaled to [0, 1] and normalised by the mean and std.

    The one normalisation: training (through `ToNormalizedTensor`) and every runtime use it. Plain numpy,
    because torch's elementwise kernels on single images cost tens of ms each on a busy 2-core machine
    (intra-op thread hand-offs; docs/BENCHMARKS.md, Service)."""
    if image.mode != "RGB":  # converting is decoding's job (models/decoding.py), done once there
        raise ValueError(f"normalized_chw takes RGB images (models.decoding.load_image makes them), not {image.mode}")
    if out is None:
        out = np.empty((3, image.height, image.width), dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32)
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


class ResizeCenterCrop:
    """Transform step: torchvision's `Resize(round(size / crop_pct))` then `CenterCrop(size)` on a PIL image,
    computed as one resampling of the crop's source box, so the pixels the crop throws away are never resampled.

    The same output size, crop anchor, filter and sample positions as the two steps, at about 60% of their CPU
    (benchmarks/preprocessing_speed.py). Pixels agree within 2 grey levels on photo-like content
    (tests/test_preprocessing.py): each axis is one separable pass, horizontal first, as Pillow runs most resizes;
    Pillow sometimes runs the vertical pass first, and on white noise the two orders differ by up to ~20 levels.
    The rows are resampled as a horizontal pass of the transposed image: Pillow's vertical pass places a box that
    starts between two rows a fraction of a row off."""

    def __init__(self, size: int, crop_pct: float, interpolation: Image.Resampling) -> None:
        self.size, self.resize_size, self.interpolation = size, int(round(size / crop_pct)), interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width <= height:  # torchvision's resized size: the shorter side to resize_size, the longer truncated
            resized = (self.resize_size, int(self.resize_size * height / width))
        else:
            resized = (int(self.resize_size * width / height), self.resize_size)
        left, top = (int(round((side - self.size) / 2.0)) for side in resized)  # torchvision's crop anchor
        scale_x, scale_y = width / resized[0], height / resized[1]
        columns = image.resize((self.size, height), self.interpolation,
                               box=(left * scale_x, 0, (left + self.size) * scale_x, height))
        rows = columns.transpose(Image.Transpose.TRANSPOSE).resize(
            (self.size, self.size), self.interpolation, box=(top * scale_y, 0, (top + self.size) * scale_y, self.size))
        return rows.transpose(Image.Transpose.TRANSPOSE)


def eval_geometry(p: Preprocessing) -> T.Compose:
    """The deterministic resize (and crop) of inference, on PIL images."""
    if p.resize == "squash":
        return T.Compose([T.Resize((p.image_size, p.image_size), interpolation=interpolation_mode(p))])
    return T.Compose([ResizeCenterCrop(p.image_size, p.crop_pct, pil_interpolation(p))])


def eval_transform(p: Preprocessing) -> T.Compose:
    """Deterministic PIL image -> float32 CHW tensor used for validation, export and inference."""
    return T.Compose([eval_geometry(p), ToNormalizedTensor(p)])


def preprocess_batch(images: Sequence[Image.Image], p: Preprocessing) -> np.ndarray:
    """RGB PIL images -> contiguous float32 NCHW array ready for any runtime: `eval_transform`'s values,
    each image written straight into the batch."""
    batch = np.empty((len(images), 3, p.image_size, p.image_size), dtype=np.float32)
    geometry = eval_geometry(p)
    for out, image in zip(batch, images):
        normalized_chw(geometry(image), p, out=out)
    return batch
