"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits so that
softmax(logits / T) is calibrated. It is folded into the head's weights, so the exported model and every
runtime return calibrated probabilities at no cost, and top-1 predictions are unchanged."""

from __future__ import annotations

import torch

from models.network import TransferNet


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 100) -> float:
    """The T > 0 minimising the negative log-likelihood of `targets` under softmax(logits / T)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")
    logits, targets = logits.detach().float(), targets.detach().long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


@torch.no_grad()
def fold_temperature(model: TransferNet, temperature: float) -> None:
    """Divide the final linear layer by T, so that the model's logits become logits / T."""
    linear = model.head[-1]
    linear.weight.div_(temperature)
    linear.bias.div_(temperature)
