"""The fine-tuned network: a pretrained backbone plus a new classification head.

`forward` returns both the logits and the embedding (the pooled penultimate features), so one pass
serves `classify` and `embed`, and the exported TorchScript and ONNX forms keep the same two outputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from models.registry import Backbone, create_backbone


HeadInput = Literal["embedding", "l2_normalized"]
"""What the classification layer sees: the embedding as it is (the fine-tune's head, behind dropout), or the
embedding scaled to unit length (the probe's head: a logistic regression on L2-normalised frozen embeddings,
docs/TRAINING.md). Parameter-free either way: both heads have the same state-dict keys."""


class L2Normalize(nn.Module):
    """Each row scaled to unit Euclidean length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class TransferNet(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.2,
                 head_input: HeadInput = "embedding") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        first = L2Normalize() if head_input == "l2_normalized" else nn.Dropout(dropout)
        self.head = nn.Sequential(first, nn.Linear(backbone.embedding_dim, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        return self.head(embedding), embedding

    def layer_groups(self) -> list[list[nn.Module]]:
        """Layer groups from stem to head; the head is always the last group."""
        return self.backbone.layer_groups() + [[self.head]]


def build_network(backbone: str, num_classes: int, weights: str = "imagenet", dropout: float = 0.2,
                  head_input: HeadInput = "embedding") -> TransferNet:
    return TransferNet(create_backbone(backbone, weights), num_classes, dropout, head_input)
