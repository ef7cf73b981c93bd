import pytest
import torch
from torch import nn

from models.network import build_network
from training.strategies import (
    enter_train_mode,
    group_learning_rates,
    set_trainable,
    trainable_group_count,
)

STRATEGIES = ["linear-probe", "finetune", "discriminative", "gradual"]


def _norm_layers(group):
    return [m for module in group for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _apply(model, strategy, epoch, epochs):
    groups = model.layer_groups()
    count = trainable_group_count(strategy, epoch, epochs, len(groups))
    set_trainable(groups, count)
    enter_train_mode(model, groups)
    return groups, count


@pytest.fixture(scope="module")
def model():
    return build_network("efficientnet_lite0", 3, weights="none")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_freezes_exactly_what_it_says(model, strategy):
    epochs = 6
    for epoch in range(epochs):
        groups, count = _apply(model, strategy, epoch, epochs)
        expected_count = {"linear-probe": 1, "finetune": len(groups), "discriminative": len(groups)}.get(
            strategy, 1 + epoch
        )
        assert count == expected_count
        for i, group in enumerate(groups):
            trainable = i >= len(groups) - count
            params = [p for m in group for p in m.parameters()]
            assert all(p.requires_grad == trainable for p in params), (strategy, epoch, i)
            for norm in _norm_layers(group):
                assert norm.training == trainable, f"{strategy}: BatchNorm in group {i} at epoch {epoch}"
        assert model.head.training


def test_linear_probe_keeps_batchnorm_statistics(model):
    groups, _ = _apply(model, "linear-probe", 0, 1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_updates_batchnorm_statistics(model):
    _apply(model, "finetune", 0, 1)
    key = next(k for k in model.state_dict() if "running_mean" in k)
    before = model.state_dict()[key].clone()
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before, model.state_dict()[key])


def test_gradual_unfreezes_everything_by_the_last_epoch():
    counts = [trainable_group_count("gradual", e, 3, 6) for e in range(3)]
    assert counts[0] == 1 and counts[-1] == 6 and counts == sorted(counts)


def test_discriminative_learning_rates_rise_from_stem_to_head():
    rates = group_learning_rates(6, 1e-3, "discriminative", 100.0)
    assert rates[-1] == pytest.approx(1e-3)
    assert rates[0] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert group_learning_rates(6, 1e-3, "finetune", 100.0) == [1e-3] * 6
