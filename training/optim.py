"""The optimiser, its learning-rate schedule and the loss weights of a fine-tuning run."""

from __future__ import annotations

import math
from collections import Counter

import torch

from models.network import TransferNet
from training.config import TrainConfig
from training.data import ImageRecord
from training.strategies import group_learning_rates


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up over `warmup_steps`, then a cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: TransferNet, config: TrainConfig, total_steps: int):
    """Optimizer (weight decay on weights only, not on norms and biases) and a schedule over `total_steps`."""
    groups = model.layer_groups()
    rates = group_learning_rates(len(groups), config.lr, config.strategy, config.lr_spread)
    param_groups = []
    for group, lr in zip(groups, rates):
        params = [p for module in group for p in module.parameters()]
        param_groups += [
            {"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
        ]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(param_groups)
    if config.schedule == "onecycle":
        max_lr = [g["lr"] for g in param_groups]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(2, total_steps))
    else:
        warmup = max(1, round(config.warmup_fraction * total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup))
    return optimizer, scheduler


def class_weights(train: list[ImageRecord], labels: list[str]) -> torch.Tensor:
    """Inverse class frequency, normalised so that balanced classes weigh 1."""
    counts = Counter(r.label for r in train)
    total = sum(counts.values())
    return torch.tensor([total / (len(labels) * max(1, counts[label])) for label in labels], dtype=torch.float32)


def loss_function(config: TrainConfig, records: list[ImageRecord], labels: list[str],
                  device: torch.device) -> torch.nn.CrossEntropyLoss:
    """Cross-entropy with the configured label smoothing, weighted by inverse class frequency of `records`."""
    weights = class_weights(records, labels).to(device) if config.class_weights else None
    return torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
