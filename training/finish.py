"""The end of a run: the softmax temperature fitted on validation and folded into the final weights, the OOD
detector fitted on the final model, and the honest estimate (held-out test, else validation, else none)."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from training.cache import cached_batches, predict_cached, probabilities
from training.calibration import fit_temperature, fold_temperature
from training.candidates.selection import CandidateName
from training.config import TrainConfig
from training.evaluate import EvaluationReport, evaluate_predictions
from training.html_report import write_evaluation_html
from training.ood_fit import fit_run_ood
from training.run_dir import RunDir, StateDict
from training.setup import TrainingSetup


@dataclass
class ChosenWeights:
    """The chosen candidate's weights: those trained without the validation split (the temperature is fitted on
    their validation logits) and those exported (the same, or the refit on train+val)."""

    candidate: CandidateName
    calibrate: StateDict | None
    """None: no validation split (no selection run)."""
    final: StateDict
    refit: bool
    """`final` also trained on the validation split."""


def calibrate_and_test(config: TrainConfig, run: RunDir, setup: TrainingSetup, weights: ChosenWeights) -> EvaluationReport:
    """Temperature fitted on validation with the chosen candidate's weights trained without it; folded into the
    final weights (the refit's, or the same) as `model.pt`; the OOD detector fitted on validation outputs of that
    final model (`training.ood_fit`); then the held-out test, or without a test split the validation report, each
    with its image count and 95% interval."""
    model, device = setup.model, setup.device
    if weights.calibrate is None:
        return finish_without_validation(config, run, setup, weights.final)
    model.load_state_dict(weights.calibrate)
    val_logits, val_targets = predict_cached(model, setup.val_set, setup.preprocessing, device)
    temperature = fit_temperature(val_logits, val_targets)
    refit = weights.refit
    model.load_state_dict(weights.final)
    fold_temperature(model, temperature)
    run.save_final_weights(model.state_dict())
    run.save_calibration(temperature)
    fit_run_ood(config, run, model, cached_batches(setup.val_set, setup.preprocessing), device)  # final model, fp32

    if len(setup.test_set):
        test_logits, test_targets = predict_cached(model, setup.test_set, setup.preprocessing, device)
        report = evaluate_predictions(probabilities(test_logits), test_targets.numpy(), setup.labels)
        report.note = (f"held-out test split: {report.images} images never used for training or selection; the "
                       f"exported model is the {weights.candidate}" + (" refit on train+val" if refit else ""))
        write_evaluation_html(report, [r.path for r in setup.test_set.records], probabilities(test_logits),
                              test_targets.numpy(), run.evaluation_html, title="Held-out test split")
    else:
        report = evaluate_predictions(probabilities(val_logits / temperature), val_targets.numpy(), setup.labels)
        report.source = "validation"
        report.note = (f"no test split (too few images to hold one out; --test-fraction sets one): these are the "
                       f"{report.images} validation images that chose the candidate ({weights.candidate}) and the "
                       "step count, so the estimate is optimistic" + (f"; the exported model is the {weights.candidate} "
                       "refit on train+val, which also trained on them" if refit else "") + ". Measure the artifact on other labelled images with "
                       "`transfer-serve evaluate`.")
    run.save_test_report(report)
    return report


def finish_without_validation(config: TrainConfig, run: RunDir, setup: TrainingSetup,
                              final: StateDict) -> EvaluationReport:
    """No selection run: the run's weights as they are (temperature 1: no held-out image to fit one on), the test
    split if there is one, else a report that says there is no held-out estimate."""
    model, device = setup.model, setup.device
    model.load_state_dict(final)
    run.save_final_weights(model.state_dict())
    run.save_calibration(1.0)
    run.save_ood(None)  # an OOD threshold needs held-out images too
    if config.ood_method != "none":
        tqdm.write("no out-of-distribution detector for this run: no validation images to fit its threshold on")
    if len(setup.test_set):
        logits, targets = predict_cached(model, setup.test_set, setup.preprocessing, device)
        report = evaluate_predictions(probabilities(logits), targets.numpy(), setup.labels)
        report.note = (f"held-out test split: {report.images} images never used for training; probabilities not "
                       "calibrated (no validation images to fit a temperature on)")
        write_evaluation_html(report, [r.path for r in setup.test_set.records], probabilities(logits),
                              targets.numpy(), run.evaluation_html, title="Held-out test split")
    else:
        labels = setup.labels
        report = EvaluationReport(
            images=0, accuracy=0.0, macro_f1=0.0, expected_calibration_error=0.0, labels=labels, per_class={},
            confusion_matrix=[[0] * len(labels) for _ in labels], accuracy_ci95=(0.0, 1.0), source="none",
            note=(f"no held-out estimate: {len(setup.train_set) + len(setup.val_set)} labelled images are too few for a test split and for "
                  f"a validation split of at least {config.min_val_images} (--min-val-images), so all of them trained "
                  "the model for the step budget. Measure the artifact on other labelled images with `transfer-serve "
                  "evaluate`, or hold out a test split with --test-fraction."),
        )
    run.save_test_report(report)
    return report
