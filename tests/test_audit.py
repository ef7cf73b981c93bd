"""`transfer-serve audit`: planted problems found (digits demo, hymenoptera), the blockwise near-duplicate search,
confident learning, and the reports' escaping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.audit_planted import plant_problems
from training.audit.duplicates import near_groups, similar_pairs
from training.audit.label_issues import confident_learning
from training.audit.outliers import kth_neighbour_distance
from extraction.embed import embed_paths
from training.audit.run import AuditConfig, run_audit
from training.audit.schema import AuditedImage

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "hymenoptera"
AUDIT_IMAGE_SIZE = 96


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Path:
    """One exported default-backbone embedder for every audit of this module (~20 s)."""
    return tmp_path_factory.mktemp("embedder") / "efficientnet_lite0-96"


def test_similar_pairs_blockwise_equals_the_full_matrix():
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((300, 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    full = unit @ unit.T
    expected = {(i, j) for i, j in zip(*np.nonzero(full >= 0.8)) if j > i}
    i, j, s = similar_pairs(unit, 0.8, block=7, max_neighbours=299)
    assert set(zip(i.tolist(), j.tolist())) == expected and len(i) == len(expected)
    assert np.allclose(s, full[i, j])


def test_similar_pairs_stay_linear_when_every_image_looks_alike():
    unit = np.ones((500, 4), dtype=np.float32) / 2.0  # 500 identical embeddings: 124,750 pairs above any threshold
    i, j, _ = similar_pairs(unit, 0.9, block=64, max_neighbours=5)
    assert len(i) <= 500 * 5 and (i < j).all()
    assert len(near_groups([AuditedImage(path=Path(f"{n}"), label="a") for n in range(500)], unit, 0.9,
                           exclude_same=[str(n) for n in range(500)])[0].images) == 500


def test_near_groups_join_chains_and_flag_splits_and_labels():
    unit = np.array([[1, 0], [0.999, 0.045], [0.996, 0.09], [0, 1]], dtype=np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    images = [AuditedImage(path=Path(f"{n}.png"), label=label, split=split)
              for n, (label, split) in enumerate([("a", "train"), ("a", "test"), ("b", "train"), ("a", "train")])]
    (group,) = near_groups(images, unit, 0.998, exclude_same=["h0", "h1", "h2", "h3"])
    assert [i.path.name for i in group.images] == ["0.png", "1.png", "2.png"]
    assert group.across_splits and group.across_labels and group.kind == "near"


def test_kth_neighbour_distance_leaves_each_image_out():
    unit = np.eye(4, dtype=np.float32)
    unit = np.vstack([unit, unit[:1]])  # row 4 duplicates row 0
    distance = kth_neighbour_distance(unit, 1, block=2)
    assert distance[0] == pytest.approx(0.0) and distance[4] == pytest.approx(0.0)
    assert distance[1] == pytest.approx(np.sqrt(2.0))


def test_confident_learning_ranks_a_confidently_contradicted_label_first():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05]])
    targets = np.array([0, 0, 1, 1, 1])  # the last one is labelled 1 but looks like a confident 0
    scores = confident_learning(probabilities, targets, folds=2)
    assert scores.order[0] == 4
    assert scores.flagged.tolist() == [False, False, False, False, True]
    assert scores.margin[4] == pytest.approx(-0.9)


def _found_pairs(report, pairs) -> list[bool]:
    groups = [{i.path.resolve() for i in g.images} for g in report.duplicate_groups]
    return [any({a.resolve(), b.resolve()} <= g for g in groups) for a, b in pairs]


def _flipped_in_top(report, flipped, top: int = 20) -> int:
    suspects = {s.image.path.resolve() for s in report.label_suspects[:top]}
    return sum(path.resolve() in suspects for path in flipped)


@pytest.mark.slow
def test_audit_finds_the_problems_planted_in_the_digits_demo(tmp_path, embedder):
    from training.demo_data import write_digits_folder

    write_digits_folder(tmp_path / "digits")
    planted = plant_problems(tmp_path / "digits", tmp_path / "work")
    report = run_audit(AuditConfig(data=planted.manifest, output=tmp_path / "audit", image_size=AUDIT_IMAGE_SIZE,
                                   embedder=embedder, show_progress=False), embed_paths)
    assert [u.path for u in report.unreadable] == [planted.truncated]
    assert all(_found_pairs(report, planted.split_copies)) and all(_found_pairs(report, planted.label_copies))
    across_splits = [g for g in report.duplicate_groups if g.across_splits]
    across_labels = [g for g in report.duplicate_groups if g.across_labels]
    assert len(across_splits) >= 5 and len(across_labels) >= 3
    assert _flipped_in_top(report, planted.flipped) >= 8
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert written["schema_version"] == 1 and written["summary"] == report.summary
    assert "5 duplicate groups across splits" in report.summary or "duplicate groups across splits" in report.summary
    assert (tmp_path / "audit" / "audit.html").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"real photos not present at {HYMENOPTERA}")
def test_audit_finds_the_problems_planted_in_hymenoptera(tmp_path):
    """Photos at the backbone's own 224 px (at 96 px only 5 of the 10 flips reached the top 20)."""
    planted = plant_problems(HYMENOPTERA, tmp_path / "work")
    report = run_audit(AuditConfig(data=planted.manifest, output=tmp_path / "audit", show_progress=False), embed_paths)
    assert planted.truncated in [u.path for u in report.unreadable]
    assert all(_found_pairs(report, planted.split_copies)) and all(_found_pairs(report, planted.label_copies))
    assert _flipped_in_top(report, planted.flipped) >= 8


def test_audit_cli_refuses_a_missing_folder_with_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["audit", str(tmp_path / "nope"), "--output", str(tmp_path / "out"),
                                      "--artifact", str(tmp_path / "no-artifact")])
    assert result.exit_code != 0
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output


def test_train_has_a_no_audit_flag_that_reaches_the_config():
    from typer.testing import CliRunner

    from cli import app
    from training.config import TrainConfig

    assert "--no-audit" in CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert TrainConfig(data="d", output="o").audit is True and TrainConfig(data="d", output="o", audit=False).audit is False
