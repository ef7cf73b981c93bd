import torch

from models.network import build_network
from training.calibration import fit_temperature, fold_temperature


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2.0
    targets = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(true_logits * 3.0, targets)  # a model 3x too confident
    assert abs(temperature - 3.0) < 0.3


def test_folding_divides_logits_and_keeps_predictions():
    model = build_network("resnet18", 3, weights="none").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before, embedding = model(x)
        fold_temperature(model, 2.5)
        after, embedding_after = model(x)
    assert torch.allclose(after, before / 2.5, atol=1e-5)
    assert torch.equal(embedding, embedding_after)
    assert torch.equal(after.argmax(1), before.argmax(1))
