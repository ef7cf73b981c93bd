"""The probe candidate: the pretrained backbone, frozen, and a linear head fitted on its L2-normalised embeddings
by multinomial logistic regression (L-BFGS, scikit-learn), its strength C chosen by stratified k-fold
cross-validation on the labelled images.

It costs one forward pass per image and a convex fit (seconds), needs no step count, and on images close to
ImageNet with few labels it often beats fine-tuning (issue 19: 79.0% against 67.5% at 10 photos per class). It
exports as any model: the same `TransferNet`, whose head (`head_input="l2_normalized"`: the normalisation, then
the probe's linear layer) carries the probe's weights, so the artifact, its parity proof, the temperature and the
OOD detector are the fine-tune's.

L2-normalised rather than standardised embeddings (until 2026-12-06: StandardScaler, C from 1e-4 to 1): on the
product's own splits (docs/TRAINING.md, "The probe's input"), standardising 1,280 dimensions from 17 photos cost 6.5
to 11 points on hymenoptera at 10 photos per class (82.4 / 88.2 / 83.0% against 88.9 / 94.8 / 94.1%, 3 samplings),
and 1.3 to 3.0 on digits at 20 per class; on all 208 hymenoptera training photos the standardised one was 0 to 2.0
points higher.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from models.network import HeadInput, TransferNet
from models.preprocessing import Preprocessing
from training.cache import CachedImages, predict_cached
from training.candidates.selection import CandidateEstimate
from training.config import TrainConfig
from training.run_dir import RunDir
from training.setup import TrainingSetup, new_model

C_GRID = np.logspace(-2, 2, 9)
"""Inverse regularisation strengths tried, half a decade apart. On unit-length embeddings the digits chose 10 to 32
and few photos 1 to 10 (docs/TRAINING.md); the datasets README's reference probe tries 0.1 to 10."""
MAX_FOLDS = 5
MAX_ITERATIONS = 1000
TOLERANCE = 1e-4
"""scikit-learn's default and the reference probe's (benchmarks/probe.py). Until 2026-12-07 1e-3, which stops L-BFGS
before the optimum on unit-length embeddings: on the 1,797 digits' embeddings the 5-fold CV accuracy was 0.905 at
1e-3 (C = 100) against 0.943 at 1e-4 (C = 31.6), for 3.5 against 11.7 CPU-seconds; on hymenoptera's 245 photos, the
same C = 10 tested 93.46% at 1e-3 and 94.12% at 1e-4 and at 1e-6 (docs/TRAINING.md)."""
PROBE_HEAD_INPUT: HeadInput = "l2_normalized"
FIT_THREADS = 1
"""The fits run their BLAS on one thread: on the shared 2-core CPU (load ~7), the cross-validated fit of 170
embeddings of 1,280 dimensions took 18.8 CPU-seconds (32.8 s wall) with the default thread pools and 0.6 (1.0 s)
with one."""


class ProbeFit(BaseModel):
    """How a probe was fitted: its strength, and the cross-validated accuracy that chose it."""

    C: float
    folds: int
    """Stratified folds of the cross-validation (0: too few images per class to cross-validate; C = 1)."""
    cv_accuracy: float | None
    """Mean accuracy over the folds at the chosen C (None without cross-validation)."""
    images: int


def embed(model: TransferNet, cached: CachedImages, preprocessing: Preprocessing,
          device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, D) float64, class indices (N,)) of the cached images through the frozen backbone."""
    _, targets, embeddings = predict_cached(model, cached, preprocessing, device, with_embeddings=True)
    return embeddings.double().numpy(), targets.numpy()


def l2_normalized(embeddings: np.ndarray) -> np.ndarray:
    """Each row at unit length (what `models.network.L2Normalize` does in the exported head)."""
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def fit_probe(embeddings: np.ndarray, targets: np.ndarray, num_classes: int, seed: int,
              C: float | None = None) -> tuple[torch.Tensor, torch.Tensor, ProbeFit]:
    """The head's (weight (K, D), bias (K,)) of a logistic regression on the L2-normalised embeddings, C given or
    by k-fold cross-validation (k = min(5, the rarest class's count)); the head normalises its input the same way."""
    x = l2_normalized(embeddings)
    folds = int(min(MAX_FOLDS, np.bincount(targets, minlength=num_classes).min()))
    with warnings.catch_warnings(), threadpool_limits(limits=FIT_THREADS):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announces 1.10's defaults; ours are explicit
        if C is None and folds >= 2:
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
            model = LogisticRegressionCV(Cs=C_GRID, cv=splitter, max_iter=MAX_ITERATIONS, tol=TOLERANCE,
                                         scoring="accuracy").fit(x, targets)
            fit = ProbeFit(C=float(np.ravel(model.C_)[0]), folds=folds, cv_accuracy=_best_cv_score(model.scores_),
                           images=len(targets))
        else:
            C = 1.0 if C is None else C
            model = LogisticRegression(C=C, max_iter=MAX_ITERATIONS, tol=TOLERANCE).fit(x, targets)
            fit = ProbeFit(C=C, folds=0, cv_accuracy=None, images=len(targets))
    weight, bias = _class_logits(model.coef_, model.intercept_, model.classes_, num_classes)
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), fit


def _best_cv_score(scores: dict | np.ndarray) -> float:
    """The mean fold accuracy at the best C, from `LogisticRegressionCV.scores_` (a dict of one identical
    (folds, Cs) array per class for a multinomial fit, or that array)."""
    array = np.asarray(next(iter(scores.values())) if isinstance(scores, dict) else scores, dtype=float)
    return float(array.reshape(array.shape[0], len(C_GRID), -1).mean(axis=(0, 2)).max())


def _class_logits(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One logit row per class: scikit-learn's binary model has one row (the logit of class 1), which becomes
    two rows whose difference it is; a class absent from the fit gets a logit far below the others."""
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, -1e4)
    weight[classes], bias[classes] = coef, intercept
    return weight, bias


@torch.no_grad()
def set_head(model: TransferNet, weight: torch.Tensor, bias: torch.Tensor) -> TransferNet:
    """`model` with its classification layer set to (weight, bias)."""
    linear = model.head[-1]
    linear.weight.copy_(weight.to(linear.weight))
    linear.bias.copy_(bias.to(linear.bias))
    return model


@torch.no_grad()
def _head_accuracy(model: TransferNet, embeddings: np.ndarray, targets: np.ndarray) -> float:
    """Accuracy of the network's own head (the one exported: normalisation, then the probe's layer) on embeddings."""
    head = model.head.eval()
    logits = head(torch.from_numpy(embeddings).float().to(head[-1].weight.device))
    return float((logits.argmax(1).cpu().numpy() == targets).mean())


@dataclass
class ProbeRun:
    """The probe fitted on the train split, and the embeddings its refit on train+val reuses."""

    estimate: CandidateEstimate
    fit: ProbeFit
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]


def train_probe(config: TrainConfig, run: RunDir, setup: TrainingSetup, show_progress: bool) -> ProbeRun:
    """Embed the train and validation splits at the serving size through the pretrained backbone, fit the probe
    on train (C by k-fold cross-validation there), score it on validation; its network is `probe.pt`."""
    model = new_model(config, setup.labels, setup.device, config.weights, head_input=PROBE_HEAD_INPUT)
    side = setup.preprocessing.image_size
    train_images = CachedImages.build(setup.train_set.records, setup.labels, setup.preprocessing, side,
                                      max(1, config.workers))
    train = embed(model, train_images, setup.preprocessing, setup.device)
    val = embed(model, setup.val_set, setup.preprocessing, setup.device)
    weight, bias, fit = fit_probe(*train, len(setup.labels), config.seed)
    run.save_probe_weights(set_head(model, weight, bias).state_dict())
    accuracy = _head_accuracy(model, *val) if len(val[1]) else None
    how = (f"logistic regression on the L2-normalised frozen embeddings of {fit.images} training images, C={fit.C:.3g} by "
           + (f"{fit.folds}-fold cross-validation" if fit.folds else "default (too few images per class to "
              "cross-validate)") + ", scored on the validation split")
    estimate = CandidateEstimate(candidate="probe", accuracy=accuracy, images=len(val[1]), how=how,
                                 cv_accuracy=fit.cv_accuracy, head_input=PROBE_HEAD_INPUT)
    if show_progress:
        cv = f", {fit.folds}-fold CV accuracy {fit.cv_accuracy:.4f}" if fit.cv_accuracy is not None else ""
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        tqdm.write(f"probe: C={fit.C:.3g}{cv}; validation accuracy {shown} on {len(val[1])} images")
    return ProbeRun(estimate, fit, train, val)


def refit_probe(config: TrainConfig, run: RunDir, setup: TrainingSetup, probe: ProbeRun) -> None:
    """The probe fitted again on train+val with the C cross-validation chose on train (one fit, not a grid
    of k): `probe_refit.pt`."""
    embeddings = np.concatenate([probe.train[0], probe.val[0]])
    targets = np.concatenate([probe.train[1], probe.val[1]])
    weight, bias, _ = fit_probe(embeddings, targets, len(setup.labels), config.seed, C=probe.fit.C)
    model = new_model(config, setup.labels, torch.device("cpu"), "none", head_input=PROBE_HEAD_INPUT)
    model.load_state_dict(run.load_probe_weights())
    run.save_probe_weights(set_head(model, weight, bias).state_dict(), refit=True)
