"""Fine-tuning strategies: which layer groups train at each epoch, and at what learning rate.

Layer groups run from stem to head (`TransferNet.layer_groups`). A frozen group has
`requires_grad=False` on every parameter and its BatchNorm layers kept in eval mode, so their running
statistics stay the ImageNet ones.

- linear-probe: only the head trains.
- finetune: every group trains at the same learning rate.
- discriminative: every group trains; learning rates rise geometrically from `lr / lr_spread` (stem) to `lr` (head).
- gradual: the head first, then one more group from the top at a time until all train, with
  discriminative learning rates (ULMFiT / fastai).
"""

from __future__ import annotations

from torch import nn

from training.config import Strategy

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def group_learning_rates(num_groups: int, lr: float, strategy: Strategy, lr_spread: float) -> list[float]:
    if strategy in ("discriminative", "gradual") and num_groups > 1:
        return [lr * lr_spread ** (-(num_groups - 1 - i) / (num_groups - 1)) for i in range(num_groups)]
    return [lr] * num_groups


def trainable_group_count(strategy: Strategy, epoch: int, epochs: int, num_groups: int) -> int:
    """How many groups, counted from the head down, train during `epoch` (0-based)."""
    if strategy == "linear-probe":
        return 1
    if strategy == "gradual":
        return 1 + round(epoch * (num_groups - 1) / max(1, epochs - 1))
    return num_groups


def set_trainable(groups: list[list[nn.Module]], count: int) -> None:
    """Unfreeze the top `count` groups and freeze the rest."""
    first_trainable = len(groups) - count
    for i, group in enumerate(groups):
        for module in group:
            for parameter in module.parameters():
                parameter.requires_grad_(i >= first_trainable)


def is_frozen(group: list[nn.Module]) -> bool:
    return not any(p.requires_grad for module in group for p in module.parameters())


def enter_train_mode(model: nn.Module, groups: list[list[nn.Module]]) -> None:
    """`model.train()`, except that BatchNorm layers in frozen groups keep their running statistics."""
    model.train()
    for group in groups:
        if is_frozen(group):
            for module in group:
                for layer in module.modules():
                    if isinstance(layer, _NORM_TYPES):
                        layer.eval()
