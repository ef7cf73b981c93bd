import numpy as np
import pytest

from training.evaluate import evaluate_predictions, expected_calibration_error, save_confusion_matrix_png


def test_metrics_on_a_known_confusion(tmp_path):
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    targets = [0, 0, 1, 1]
    report = evaluate_predictions(probabilities, targets, ["a", "b"])
    assert report.accuracy == pytest.approx(0.75)
    assert report.confusion_matrix == [[2, 0], [1, 1]]
    assert report.per_class["a"].precision == pytest.approx(2 / 3)
    assert report.per_class["b"].recall == pytest.approx(0.5)
    assert report.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)
    path = save_confusion_matrix_png(report, tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expected_calibration_error():
    # Perfectly confident and right: no calibration error.
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == pytest.approx(0.0)
    # 0.8 confident, right half the time: |0.5 - 0.8| = 0.3.
    probabilities = np.array([[0.8, 0.2]] * 4)
    assert expected_calibration_error(probabilities, np.array([0, 0, 1, 1])) == pytest.approx(0.3)
