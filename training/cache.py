"""Images decoded once and kept in memory, and what runs on them: normalisation, augmentation, prediction.

Training images are decoded through `models.decoding.load_image` with the serving preprocessing and cached
as uint8 at `CACHE_MARGIN` x the training crop (random resized crops are cut from it); validation and test
images are cached at the serving size. Augmentation (random resized crop, flip, optional TrivialAugment)
runs on the cache, so no image is decoded twice in a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torchvision.transforms import v2 as T

from models.network import TransferNet
from models.preprocessing import Preprocessing, interpolation_mode
from training.config import TrainConfig
from training.data import ImageRecord, decode_to_cache

CACHE_MARGIN = 1.15
"""Training images are cached at this many times the training crop side (random resized crops are cut from it)."""


@dataclass
class CachedImages:
    """Images decoded once: uint8 (N, 3, side, side) and their class indices."""

    images: torch.Tensor
    targets: torch.Tensor
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def build(cls, records: list[ImageRecord], labels: list[str], preprocessing: Preprocessing, side: int,
              workers: int) -> "CachedImages":
        index = {label: i for i, label in enumerate(labels)}
        images = decode_to_cache(records, preprocessing, side, workers)
        return cls(images, torch.tensor([index[r.label] for r in records], dtype=torch.long), list(records))

    @classmethod
    def concat(cls, parts: list["CachedImages"]) -> "CachedImages":
        return cls(torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]),
                   [r for p in parts for r in p.records])

    def head(self, count: int) -> "CachedImages":
        """The first `count` images."""
        return CachedImages(self.images[:count], self.targets[:count], self.records[:count])


def cached_batches(
    cached: CachedImages, preprocessing: Preprocessing, batch_size: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float32 images, targets) batches of the cached images, in order."""
    for start in range(0, len(cached), batch_size):
        yield normalize_batch(cached.images[start : start + batch_size], preprocessing), cached.targets[start : start + batch_size]


def normalize_batch(images: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """uint8 NCHW -> the float32 values of `models.preprocessing.normalized_chw` (same operations, same order)."""
    out = images.float().mul_(np.float32(1 / 255))
    out -= torch.tensor(p.mean, dtype=torch.float32).view(1, 3, 1, 1)
    out /= torch.tensor(p.std, dtype=torch.float32).view(1, 3, 1, 1)
    return out


class Augment:
    """Training augmentation on cached uint8 images: random resized crop to the training side, optional
    horizontal flip and TrivialAugmentWide (torchvision.transforms.v2), then the serving normalisation."""

    def __init__(self, config: TrainConfig, preprocessing: Preprocessing, side: int) -> None:
        interpolation = interpolation_mode(preprocessing)
        steps: list[T.Transform] = [T.RandomResizedCrop(side, scale=(config.crop_min_scale, 1.0),
                                                        interpolation=interpolation, antialias=True)]
        if config.horizontal_flip:
            steps.append(T.RandomHorizontalFlip())
        if config.trivial_augment:
            steps.append(T.TrivialAugmentWide(interpolation=interpolation))
        self.transform = T.Compose(steps)
        self.preprocessing = preprocessing

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(torch.stack([self.transform(image) for image in images]), self.preprocessing)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; full precision on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_cached(
    model: TransferNet, cached: CachedImages, preprocessing: Preprocessing, device: torch.device, batch_size: int = 64,
    with_embeddings: bool = False,
):
    """Logits (float32, CPU) and targets of every cached image (and the embeddings when asked), in eval mode."""
    model.eval()
    all_logits, all_embeddings = [], []
    for start in range(0, len(cached), batch_size):
        images = normalize_batch(cached.images[start : start + batch_size], preprocessing)
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits, embedding = model(images)
        all_logits.append(logits.float().cpu())
        if with_embeddings:
            all_embeddings.append(embedding.float().cpu())
    logits = torch.cat(all_logits) if all_logits else torch.empty(0)
    if with_embeddings:
        return logits, cached.targets, (torch.cat(all_embeddings) if all_embeddings else torch.empty(0))
    return logits, cached.targets


def probabilities(logits: torch.Tensor) -> np.ndarray:
    return logits.softmax(1).numpy()
