"""Fine-tuning strategies: which layer groups train at each validation interval, and at what learning rate.

Layer groups run from stem to head (`TransferNet.layer_groups`). A frozen group has
`requires_grad=False` on every parameter and its BatchNorm layers kept in eval mode, so their running
statistics stay the ImageNet ones.

A strategy is data (`FineTuneStrategy`), registered by name in `STRATEGIES`: a new one is one entry there,
and `TrainConfig.strategy` accepts exactly the registered names.

- linear-probe: only the head trains.
- finetune: every group trains at the same learning rate.
- discriminative: every group trains; learning rates rise geometrically from `lr / lr_spread` (stem) to `lr` (head).
- gradual: the head first, then one more group from the top at a time until all train, with
  discriminative learning rates (ULMFiT / fastai).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

TrainableGroups = Callable[[int, int, int], int]
"""(interval, intervals, groups) -> how many groups, counted from the head down, train during `interval` (0-based)."""


@dataclass(frozen=True)
class FineTuneStrategy:
    """What a strategy decides: whether learning rates fall from head to stem, and which groups train when."""

    discriminative_lr: bool
    trainable_groups: TrainableGroups


def _head_only(interval: int, intervals: int, groups: int) -> int:
    return 1


def _all_groups(interval: int, intervals: int, groups: int) -> int:
    return groups


def _one_more_group_per_interval(interval: int, intervals: int, groups: int) -> int:
    return 1 + round(interval * (groups - 1) / max(1, intervals - 1))


STRATEGIES: dict[str, FineTuneStrategy] = {
    "linear-probe": FineTuneStrategy(discriminative_lr=False, trainable_groups=_head_only),
    "finetune": FineTuneStrategy(discriminative_lr=False, trainable_groups=_all_groups),
    "discriminative": FineTuneStrategy(discriminative_lr=True, trainable_groups=_all_groups),
    "gradual": FineTuneStrategy(discriminative_lr=True, trainable_groups=_one_more_group_per_interval),
}

Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]  # the registered names, and only those
"""A registered strategy's name (what `--strategy` accepts)."""


def group_learning_rates(num_groups: int, lr: float, strategy: Strategy, lr_spread: float) -> list[float]:
    if STRATEGIES[strategy].discriminative_lr and num_groups > 1:
        return [lr * lr_spread ** (-(num_groups - 1 - i) / (num_groups - 1)) for i in range(num_groups)]
    return [lr] * num_groups


def trainable_group_count(strategy: Strategy, epoch: int, epochs: int, num_groups: int) -> int:
    """How many groups, counted from the head down, train during `epoch` (0-based) of `epochs`."""
    return STRATEGIES[strategy].trainable_groups(epoch, epochs, num_groups)


def set_trainable(groups: list[list[nn.Module]], count: int) -> None:
    """Unfreeze the top `count` groups and freeze the rest."""
    first_trainable = len(groups) - count
    for i, group in enumerate(groups):
        for module in group:
            for parameter in module.parameters():
                parameter.requires_grad_(i >= first_trainable)


def is_frozen(group: list[nn.Module]) -> bool:
    return not any(p.requires_grad for module in group for p in module.parameters())


def enter_train_mode(model: nn.Module, groups: list[list[nn.Module]], freeze_bn: bool = False) -> None:
    """`model.train()`, except that BatchNorm layers in frozen groups keep their running statistics; with
    `freeze_bn` every BatchNorm layer of the model does (its scale and shift still train)."""
    model.train()
    frozen = [model] if freeze_bn else [module for group in groups if is_frozen(group) for module in group]
    for module in frozen:
        for layer in module.modules():
            if isinstance(layer, _NORM_TYPES):
                layer.eval()
