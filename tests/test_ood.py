"""models/ood.py: thresholds hit their rejection rate on held-out ID data, far OOD is flagged, every score
points the same way, kNN leave-one-out and Mahalanobis cross-fitting remove the in-sample bias, save/load is
exact and pickle-free, and bad input fails with a clear message."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.ood import (
    DEFAULT_METHOD,
    METHODS,
    OOD_FILE,
    OODDetector,
    OODError,
    OODSummary,
    _kth_distance,
    energy_score,
    evaluate_ood,
    msp_score,
)

CLASSES, DIM = 4, 32


class Blobs:
    """Gaussian class clusters in embedding space; logits are a linear head on the embedding (as in the network)."""

    def __init__(self, seed: int = 0, classes: int = CLASSES, dim: int = DIM, spread: float = 3.0) -> None:
        rng = np.random.default_rng(seed)
        self.means = rng.normal(size=(classes, dim)) * spread
        self.head = self.means.T / 5.0
        self.rng = rng

    def sample(self, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = self.rng.integers(0, len(self.means), n)
        embeddings = self.means[labels] + self.rng.normal(size=(n, self.means.shape[1])) + shift
        return embeddings @ self.head, embeddings, labels

    def far_ood(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Points between and away from every cluster: small, flat logits and embeddings nowhere near a class."""
        embeddings = self.rng.normal(size=(n, self.means.shape[1])) * 0.5 - self.means.mean(axis=0) * 3
        return embeddings @ self.head * 0.05, embeddings


@pytest.fixture(scope="module")
def blobs() -> Blobs:
    return Blobs()


@pytest.mark.parametrize("method", METHODS)
def test_threshold_rejects_the_target_share_of_held_out_id_images(method):
    data = Blobs(seed=1)
    fit_n, held_n, target = 2000, 10000, 0.05
    detector = OODDetector.fit(method, *data.sample(fit_n), target_rejection=target)
    logits, embeddings, _ = data.sample(held_n)
    rate = detector.flag(logits, embeddings).mean()
    # The threshold is an estimated quantile (error from fit_n) applied to a fresh sample (error from held_n).
    sigma = math.sqrt(target * (1 - target) * (1 / fit_n + 1 / held_n))
    assert abs(rate - target) < 4 * sigma, (method, rate)
    assert detector.summary.target_rejection_rate == target
    assert abs(detector.summary.measured_rejection_rate - target) < 2 / fit_n


@pytest.mark.parametrize("target", [0.01, 0.2])
def test_other_target_rates_are_honoured(target):
    data = Blobs(seed=2)
    detector = OODDetector.fit("knn", *data.sample(1500), target_rejection=target)
    rate = detector.flag(*data.sample(6000)[:2]).mean()
    assert abs(rate - target) < 4 * math.sqrt(target * (1 - target) * (1 / 1500 + 1 / 6000)), rate


@pytest.mark.parametrize("method", METHODS)
def test_far_ood_points_are_flagged_and_score_higher(method, blobs):
    detector = OODDetector.fit(method, *blobs.sample(800))
    id_logits, id_embeddings, _ = blobs.sample(500)
    ood_logits, ood_embeddings = blobs.far_ood(500)
    id_scores = detector.score(id_logits, id_embeddings)
    ood_scores = detector.score(ood_logits, ood_embeddings)
    assert detector.flag(ood_logits, ood_embeddings).mean() > 0.95, method
    result = evaluate_ood(id_scores, ood_scores, detector.threshold)
    assert result.auroc > 0.98 and result.flagged_share_ood > 0.95, (method, result)


def test_score_directions_each_method():
    """Higher = more OOD, method by method, on hand-made inputs where the answer is obvious."""
    confident, unsure = np.array([[12.0, 0.0, 0.0]]), np.array([[0.1, 0.0, 0.05]])
    assert msp_score(confident)[0] < msp_score(unsure)[0]
    assert 0.0 <= msp_score(confident)[0] < 1e-4 and msp_score(unsure)[0] <= 1 - 1 / 3 + 1e-12
    large, small = np.array([[9.0, 1.0, 1.0]]), np.array([[0.5, 0.4, 0.3]])
    assert energy_score(large)[0] < energy_score(small)[0]
    np.testing.assert_allclose(energy_score(small), -np.log(np.exp(small).sum(1)))

    rng = np.random.default_rng(3)
    centres = np.eye(3, 8) * 10
    labels = np.repeat(np.arange(3), 40)
    embeddings = centres[labels] + rng.normal(size=(120, 8)) * 0.3
    logits = embeddings[:, :3]
    near, far = centres[:1] + 0.1, np.full((1, 8), -6.0)
    for method in ("mahalanobis", "knn"):
        detector = OODDetector.fit(method, logits, embeddings, labels)
        assert detector.score(near[:, :3], near)[0] < detector.score(far[:, :3], far)[0], method
    # msp and energy fitted detectors read the logits the same way as the raw functions.
    assert OODDetector.fit("energy", logits, embeddings, labels).score(large, np.zeros((1, 8)))[0] == energy_score(large)[0]


def test_msp_keeps_confident_images_apart():
    """1 - max softmax would round both to 0.0; the score must still order them (so a quantile can split them)."""
    logits = np.array([[40.0, 0.0], [60.0, 0.0]])
    scores = msp_score(logits)
    assert scores[0] > scores[1] > 0.0


def test_knn_leave_one_out_matches_brute_force():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(30, 5))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    k = 3
    loo = _kth_distance(z, z, k, exclude=np.arange(30))
    for i in range(30):
        others = np.delete(z, i, axis=0)
        expected = np.sort(np.linalg.norm(others - z[i], axis=1))[k - 1]
        assert loo[i] == pytest.approx(expected, abs=1e-5)  # float32 similarity
    # Without leaving out, the 1st neighbour of a reference point is itself at distance 0: the bias LOO removes.
    assert np.allclose(_kth_distance(z, z, 1), 0.0, atol=1e-3)  # float32: sqrt(2 - 2 cos) ~ 3e-4 at cos = 1 - eps


def test_knn_threshold_is_calibrated_with_leave_one_out():
    """Fitted with k=1 and scored naively on its own reference set, every fitting point would score 0 and the
    threshold would be 0; with leave-one-out the fitting set's flagged share is the target and held-out agrees."""
    data = Blobs(seed=5, dim=64)
    logits, embeddings, labels = data.sample(600)
    detector = OODDetector.fit("knn", logits, embeddings, labels, k=1)
    assert detector.threshold > 0.1
    assert detector.summary.calibration == "leave-one-out"
    assert detector.score(logits, embeddings).max() < 1e-3  # its own reference (float32): the bias the LOO threshold avoids
    held = detector.flag(*data.sample(6000)[:2]).mean()
    assert abs(held - 0.05) < 4 * math.sqrt(0.05 * 0.95 * (1 / 600 + 1 / 6000)), held


def test_knn_subsampled_reference_still_calibrated():
    data = Blobs(seed=6)
    detector = OODDetector.fit("knn", *data.sample(1500), max_reference=400, k=3)
    assert detector.summary.n_reference == 400 and detector.arrays["reference"].shape == (400, DIM)
    held = detector.flag(*data.sample(6000)[:2]).mean()
    assert abs(held - 0.05) < 4 * math.sqrt(0.05 * 0.95 * (1 / 1500 + 1 / 6000)), held


def test_mahalanobis_cross_fitting_removes_in_sample_bias():
    """Few samples in many dimensions (like a validation split of 1280-d embeddings): in-sample distances are far
    smaller than fresh ones, so a threshold from them would flag far more than 5% of new ID images."""
    data = Blobs(seed=7, dim=256)
    logits, embeddings, labels = data.sample(200)
    detector = OODDetector.fit("mahalanobis", logits, embeddings, labels)
    assert detector.summary.calibration == "cross-fitted" and 0 <= detector.summary.shrinkage <= 1
    in_sample = detector.score(logits, embeddings)
    naive_threshold = np.quantile(in_sample, 0.95)
    fresh = detector.score(*data.sample(4000)[:2])
    assert (fresh > naive_threshold).mean() > 0.15  # the bias is real here
    assert abs((fresh > detector.threshold).mean() - 0.05) < 0.025  # cross-fitted threshold


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_scores_identically(method, blobs, tmp_path: Path):
    detector = OODDetector.fit(method, *blobs.sample(300))
    written = detector.save(tmp_path)
    assert written == ([] if method in ("msp", "energy") else [OOD_FILE])
    summary = OODSummary.model_validate_json(detector.summary.model_dump_json())
    loaded = OODDetector.load(tmp_path, summary)
    logits, embeddings, _ = blobs.sample(64)
    np.testing.assert_allclose(loaded.score(logits, embeddings), detector.score(logits, embeddings), rtol=0, atol=1e-6)
    assert loaded.threshold == detector.threshold
    if written:
        with np.load(tmp_path / OOD_FILE, allow_pickle=False) as data:  # plain arrays only
            assert all(data[name].dtype != object for name in data.files)


def test_load_refuses_missing_or_mismatched_files(blobs, tmp_path: Path):
    knn = OODDetector.fit("knn", *blobs.sample(100))
    with pytest.raises(OODError, match="missing"):
        OODDetector.load(tmp_path, knn.summary)
    maha = OODDetector.fit("mahalanobis", *blobs.sample(100))
    maha.save(tmp_path)
    with pytest.raises(OODError, match="not for the manifest's knn"):
        OODDetector.load(tmp_path, knn.summary)
    with pytest.raises(OODError, match="shape"):
        OODDetector.load(tmp_path, maha.summary.model_copy(update={"embedding_dim": DIM + 1}))
    (tmp_path / OOD_FILE).write_bytes(b"not an npz")
    with pytest.raises(OODError, match="not a readable"):
        OODDetector.load(tmp_path, maha.summary)


def test_bad_inputs_raise_clear_errors(blobs):
    logits, embeddings, labels = blobs.sample(50)
    with pytest.raises(OODError, match="unknown OOD method"):
        OODDetector.fit("odin", logits, embeddings, labels)
    with pytest.raises(OODError, match="number of images"):
        OODDetector.fit("knn", logits, embeddings[:-1], labels)
    with pytest.raises(OODError, match=r"\(N, C\)"):
        OODDetector.fit("msp", logits[0], embeddings, labels)
    with pytest.raises(OODError, match="NaN"):
        OODDetector.fit("energy", np.where(np.eye(50, CLASSES) > 0, np.nan, logits), embeddings, labels)
    with pytest.raises(OODError, match="labels must lie"):
        OODDetector.fit("mahalanobis", logits, embeddings, labels + CLASSES)
    with pytest.raises(OODError, match="integer class indices"):
        OODDetector.fit("mahalanobis", logits, embeddings, labels.astype(float))
    with pytest.raises(OODError, match="k < number"):
        OODDetector.fit("knn", logits, embeddings, labels, k=50)
    with pytest.raises(OODError, match="target_rejection"):
        OODDetector.fit("msp", logits, embeddings, labels, target_rejection=1.5)
    with pytest.raises(OODError, match="at least 2 fitting images of every class"):
        OODDetector.fit("mahalanobis", logits, embeddings, np.where(labels == 0, 1, labels))
    with pytest.raises(OODError, match="at least 2 in-distribution images"):
        OODDetector.fit("msp", logits[:1], embeddings[:1], labels[:1])
    detector = OODDetector.fit("knn", logits, embeddings, labels)
    with pytest.raises(OODError, match="another model"):
        detector.score(logits, np.zeros((50, DIM + 3)))
    with pytest.raises(OODError, match="another model"):
        detector.score(logits[:, :2], embeddings)


def test_evaluate_ood_metrics():
    perfect = evaluate_ood(np.array([0.1, 0.2, 0.3]), np.array([0.8, 0.9]), threshold=0.5)
    assert perfect.auroc == 1.0 and perfect.fpr_at_95_tpr == 0.0
    assert perfect.flagged_share_id == 0.0 and perfect.flagged_share_ood == 1.0
    reversed_ = evaluate_ood(np.array([0.8, 0.9]), np.array([0.1, 0.2]), threshold=0.5)
    assert reversed_.auroc == 0.0 and reversed_.fpr_at_95_tpr == 1.0
    # 20 ID scores 0..19, 20 OOD scores 10..29: catching 95% of OOD (19 of 20, score >= 11) flags ID 11..19 = 9/20.
    mixed = evaluate_ood(np.arange(20.0), np.arange(10.0, 30.0), threshold=14.5)
    assert mixed.fpr_at_95_tpr == pytest.approx(9 / 20)
    assert mixed.flagged_share_id == pytest.approx(5 / 20) and mixed.flagged_share_ood == pytest.approx(15 / 20)
    with pytest.raises(OODError):
        evaluate_ood(np.array([]), np.array([1.0]), 0.0)


def test_default_method_and_k(blobs):
    assert DEFAULT_METHOD in METHODS
    assert OODDetector.fit("knn", *blobs.sample(200)).summary.k == 10
    assert OODDetector.fit("knn", *blobs.sample(6)).summary.k == 5  # capped below the fitting images


@pytest.mark.slow
def test_ood_benchmark_quick(tmp_path: Path):
    """benchmarks/ood.py --quick end to end (two tiny digits runs; numbers meaningless, the script must not rot)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ood.py"
    spec = importlib.util.spec_from_file_location("benchmark_ood", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows, cost = module.main(["--quick", "--work", str(tmp_path), "--hymenoptera", str(tmp_path / "absent"),
                              "--batch", "4"])
    assert {row[0] for row in rows} == {"digits10", "digits8"}
    assert {row[1] for row in rows} == {"faces (LFW)", "digits 8 and 9 (near)"}
    assert cost[0][0].startswith("forward pass") and any(row[0] == "score: msp" for row in cost)
