"""The plan of a run: steps, training resolution and validation interval, sized by the data and fitted into
the time budget from the speed probe's measurements (`training.speed`)."""

from __future__ import annotations

import math
from typing import Callable

from training.config import TrainConfig
from training.data import Splits
from training.run_dir import RunPlan

EXPORT_OVERHEAD_SECONDS = 30.0
"""What a plan reserves for calibration, export (TorchScript + ONNX) and the parity check on a CPU."""

SpeedProbe = Callable[[int], tuple[float, float]]
"""side -> (seconds per training step at side, seconds per validation image)."""


def plan_run(config: TrainConfig, splits: Splits, seconds_so_far: float = 0.0, probe: SpeedProbe | None = None) -> RunPlan:
    """Steps, training resolution and validation interval: what the data asks for, fitted into the time budget.

    Without a probe (or with --steps / --epochs / --train-image-size fixing everything) no time is estimated."""
    serve = config.preprocessing().image_size
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    select = n_val >= config.min_val_images
    refit = config.refit or not select
    refit_images = n_train + n_val if refit else n_train
    wanted = config.budget_steps(n_train if select else refit_images)
    side = config.train_image_size or config.default_train_image_size()
    budget = config.time_budget
    fixed = config.steps is not None or config.epochs is not None
    common = dict(batch_size=min(config.batch_size, n_train if select else refit_images), image_size=serve,
                  train_images=n_train, val_images=n_val, test_images=n_test, refit=refit, refit_images=refit_images,
                  budget_steps=wanted, time_budget_seconds=budget, select=select)
    if budget is None or probe is None:
        steps = wanted
        return RunPlan(steps=steps, eval_every=config.evaluation_interval(steps, n_train), train_image_size=side,
                       reason="" if budget is None else "no speed probe", **common)
    step_seconds, eval_seconds = probe(side)
    refit_factor = refit_images / n_train if (refit and select) else 0.0

    def estimate(steps: int, at: int) -> float:
        per_step = step_seconds * (at / side) ** 2
        evals = math.ceil(steps / config.evaluation_interval(steps, n_train)) if select else -2
        return (seconds_so_far + steps * per_step * (1 + refit_factor) + (evals + 2) * n_val * eval_seconds
                + n_test * eval_seconds + (EXPORT_OVERHEAD_SECONDS if config.export else 0.0))

    reason = ""
    chosen_side, steps = side, wanted
    if not fixed and estimate(wanted, side) > budget:
        sides = [side] if config.train_image_size else [s for s in range(side, min(128, side) - 1, -32)] or [side]
        fits = [s for s in sides if estimate(wanted, s) <= budget]
        if fits:
            chosen_side = fits[0]
            reason = f"training side lowered from {side} to {chosen_side} px to fit the time budget"
        else:
            chosen_side = sides[-1]
            per_step = step_seconds * (chosen_side / side) ** 2 * (1 + refit_factor)
            spare = budget - estimate(0, chosen_side)
            steps = max(10, min(wanted, int(spare / max(per_step + n_val * eval_seconds * 10 / max(wanted, 1), 1e-9))))
            while steps > 10 and estimate(steps, chosen_side) > budget:
                steps = max(10, int(steps * 0.9))
            reason = (f"the time budget allows {steps} of the {wanted} steps the data asks for"
                      + (f", at {chosen_side} px" if chosen_side != side else ""))
    elif fixed and estimate(wanted, side) > budget:
        reason = "over the time budget: --steps/--epochs fix the schedule"
    probe_seconds = step_seconds * (chosen_side / side) ** 2
    return RunPlan(steps=steps, eval_every=config.evaluation_interval(steps, n_train), train_image_size=chosen_side,
                   seconds_per_step=probe_seconds, estimated_seconds=estimate(steps, chosen_side), reason=reason,
                   **common)
