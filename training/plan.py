"""The plan of a run: steps, training resolution and validation interval, sized by the data and fitted into
the time budget from the speed probe's measurements (`training.speed`)."""

from __future__ import annotations

import math
from typing import Callable

from training.candidates.selection import CandidateName
from training.config import TrainConfig
from training.data import Splits
from training.run_dir import RunPlan

EXPORT_OVERHEAD_SECONDS = 30.0
"""What a plan reserves for the export (TorchScript + ONNX, the parity check, the OOD detector) on a CPU."""
PROBE_FIT_SECONDS = 10.0
"""What a plan reserves for the probe's cross-validated logistic-regression fits (beyond embedding the images)."""


AFTER_TRAINING_MARGIN = 1.25
"""What followed training took 1.18-1.23x its estimate from validation passes (lite1 and lite2 on P6, 2026-12-07:
calibration, the OOD fit and the test report each carry more than a validation pass): estimates scale by this."""


def after_training_seconds(val_images: int, test_images: int, eval_seconds: float, export: bool) -> float:
    """What follows training: calibration and the OOD fit (a validation pass each), the test pass, the export."""
    passes = (2 * val_images + test_images) * eval_seconds
    return AFTER_TRAINING_MARGIN * (passes + (EXPORT_OVERHEAD_SECONDS if export else 0.0))


def reserve_seconds(val_images: int, test_images: int, eval_seconds: float, step_seconds: float, export: bool) -> float:
    """How long before the time budget ends training must stop: what follows it, and the step begun just before
    the deadline with the validation pass that closes its phase (the deadline gates the start of a step)."""
    return after_training_seconds(val_images, test_images, eval_seconds, export) + step_seconds + val_images * eval_seconds


SpeedProbe = Callable[[int], tuple[float, float]]
"""side -> (seconds per training step at side, seconds per validation image)."""


def plan_candidates(config: TrainConfig, val_images: int) -> list[CandidateName]:
    """`--candidate`, or with `auto` the probe and the fine-tune (the fine-tune alone without a validation image
    to compare them on)."""
    if config.candidate != "auto":
        return [config.candidate]
    return ["probe", "finetune"] if val_images else ["finetune"]


def plan_run(config: TrainConfig, splits: Splits, seconds_so_far: float = 0.0, probe: SpeedProbe | None = None) -> RunPlan:
    """Steps, training resolution and validation interval: what the data asks for, fitted into the time budget.

    When the budget binds, the steps are what buys accuracy: the training side is lowered first, then the refit
    on train+val is dropped (the selection run's best weights are exported), and only then are steps cut.
    Without a probe (or with --steps / --epochs / --train-image-size fixing everything) no time is estimated."""
    serve = config.preprocessing().image_size
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    candidates = plan_candidates(config, n_val)
    choose_steps = n_val >= config.min_val_images
    select = choose_steps or (n_val > 0 and "probe" in candidates)  # the probe is compared, calibrated, then refit
    refit = config.refit or not select
    refit_images = n_train + n_val if refit else n_train
    wanted = config.budget_steps(n_train if select else refit_images)
    side = config.train_image_size or config.default_train_image_size()
    budget = config.time_budget
    fixed = config.steps is not None or config.epochs is not None

    def interval(steps: int) -> int:
        return config.evaluation_interval(steps, n_train) if choose_steps else max(1, steps)

    def plan(steps: int, train_side: int, **timing) -> RunPlan:
        return RunPlan(steps=steps, eval_every=interval(steps), train_image_size=train_side,
                       batch_size=min(config.batch_size, n_train if select else refit_images), image_size=serve,
                       train_images=n_train, val_images=n_val, test_images=n_test, refit=refit,
                       refit_images=n_train + n_val if refit else n_train, budget_steps=wanted,
                       time_budget_seconds=budget, select=select, choose_steps=choose_steps, candidates=candidates,
                       **timing)

    if budget is None or probe is None:
        return plan(wanted, side, reason="" if budget is None else "no speed probe")
    step_seconds, eval_seconds = probe(side)
    refit_factor = refit_images / n_train if (refit and select) else 0.0
    probe_seconds = (n_train + n_val) * eval_seconds + PROBE_FIT_SECONDS if "probe" in candidates else 0.0
    finetune_share = 1.0 if "finetune" in candidates else 0.0

    def estimate(steps: int, at: int) -> float:
        per_step = step_seconds * (at / side) ** 2
        evals = math.ceil(steps / interval(steps)) if select else -2
        return (seconds_so_far + finetune_share * steps * per_step * (1 + refit_factor) + probe_seconds
                + evals * n_val * eval_seconds + after_training_seconds(n_val, n_test, eval_seconds, config.export))

    reasons = []
    chosen_side, steps = side, wanted
    if not fixed and estimate(wanted, side) > budget:
        sides = [side] if config.train_image_size else [s for s in range(side, min(128, side) - 1, -32)] or [side]
        fits = [s for s in sides if estimate(wanted, s) <= budget]
        if not fits and refit and select:
            refit, refit_factor = False, 0.0
            reasons.append("no refit on train+val: the time budget buys the selection run's steps instead "
                           "(its best weights are exported)")
            fits = [s for s in sides if estimate(wanted, s) <= budget]
        if fits:
            chosen_side = fits[0]
            if chosen_side != side:
                reasons.append(f"training side lowered from {side} to {chosen_side} px to fit the time budget")
        else:
            chosen_side = sides[-1]
            per_step = step_seconds * (chosen_side / side) ** 2 * (1 + refit_factor)
            spare = budget - estimate(0, chosen_side)
            steps = max(10, min(wanted, int(spare / max(per_step + n_val * eval_seconds * 10 / max(wanted, 1), 1e-9))))
            while steps > 10 and estimate(steps, chosen_side) > budget:
                steps = max(10, int(steps * 0.9))
            reasons.append(f"the time budget allows {steps} of the {wanted} steps the data asks for"
                           + (f", at {chosen_side} px" if chosen_side != side else ""))
    elif fixed and estimate(wanted, side) > budget:
        reasons.append("over the time budget: --steps/--epochs fix the schedule")
    per_step = step_seconds * (chosen_side / side) ** 2
    return plan(steps, chosen_side, seconds_per_step=per_step, eval_seconds_per_image=eval_seconds,
                estimated_seconds=estimate(steps, chosen_side), reason="; ".join(reasons),
                reserve_seconds=reserve_seconds(n_val, n_test, eval_seconds, per_step, config.export))
