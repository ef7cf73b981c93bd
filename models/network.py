"""The fine-tuned network: a pretrained backbone plus a new classification head.

`forward` returns both the logits and the embedding (the pooled penultimate features), so one pass
serves `classify` and `embed`, and the exported TorchScript and ONNX forms keep the same two outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from models.registry import Backbone, create_backbone


class TransferNet(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.embedding_dim, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        return self.head(embedding), embedding

    def layer_groups(self) -> list[list[nn.Module]]:
        """Layer groups from stem to head; the head is always the last group."""
        return self.backbone.layer_groups() + [[self.head]]


def build_network(backbone: str, num_classes: int, weights: str = "imagenet", dropout: float = 0.2) -> TransferNet:
    return TransferNet(create_backbone(backbone, weights), num_classes, dropout)
