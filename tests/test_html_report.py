"""The HTML reports: self-contained, escaped, and rendered by headless Chromium (sections, thumbnails, no errors)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.audit.checks import warn_before_training
from training.audit.schema import (
    AuditedImage, AuditReport, AuditSettings, ClassSummary, DuplicateGroup, LabelSuspect, Outlier, UnreadableFile,
)
from training.data import ImageRecord, SkippedImage, Splits
from training.evaluate import evaluate_predictions
from training.html_report import write_audit_html, write_evaluation_html

HOSTILE = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _images(folder: Path, count: int = 6) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f'<img src=x onerror="alert({n})">{n}.png'
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _evaluation(tmp_path: Path) -> Path:
    paths = _images(tmp_path / "eval")
    labels = ["cat", HOSTILE]
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.95, 0.05], [0.3, 0.7]])
    targets = np.array([0, 1, 1, 0, 0, 1])
    report = evaluate_predictions(probabilities, targets, labels)
    return write_evaluation_html(report, paths, probabilities, targets, tmp_path / "evaluation.html",
                                 ood_scores=np.linspace(0, 1, 6))


def _audit(tmp_path: Path) -> Path:
    paths = _images(tmp_path / "audit")
    image = [AuditedImage(path=p, label=HOSTILE if n % 2 else "cat", split="train" if n < 4 else "test")
             for n, p in enumerate(paths)]
    report = AuditReport(
        settings=AuditSettings(data=str(tmp_path / HOSTILE), model="test", images=7, near_duplicate_threshold=0.97,
                               folds=2, outlier_z=3.5, capped_at=100),
        summary="1 unreadable files, 1 duplicate groups across splits",
        unreadable=[UnreadableFile(path=tmp_path / f"{HOSTILE}.png", label=HOSTILE, reason="not an image")],
        ignored_files=[],
        duplicate_groups=[DuplicateGroup(kind="exact", images=[image[0], image[4]], similarity=1.0,
                                         across_splits=True, across_labels=False)],
        label_suspects=[LabelSuspect(image=image[1], given_probability=0.01, suggested_label="cat",
                                     suggested_probability=0.99, margin=-0.98, flagged=True)],
        label_issues_flagged=1,
        classes=[ClassSummary(label="cat", images=3, per_split={"train": 2, "test": 1}, outliers=0),
                 ClassSummary(label=HOSTILE, images=3, per_split={"train": 2, "test": 1}, outliers=1)],
        outliers=[Outlier(image=image[3], score=1.2, robust_z=5.0)],
    )
    return write_audit_html(report, tmp_path / "audit.html")


@pytest.mark.parametrize("build", [_evaluation, _audit])
def test_reports_escape_names_and_labels_and_load_nothing_from_outside(tmp_path, build):
    html = build(tmp_path).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower() and "onerror=" not in html.replace("onerror=&#34;", "")
    assert not re.search(r'(src|href)="(?!data:)', html), "every image is an inline data: URI"
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert html.count('src="data:image/jpeg;base64,') >= 2


CHECK_PAGE = """<!DOCTYPE html><html><body><iframe id="report" src="{src}" width="1280" height="900"></iframe>
<pre id="result">pending</pre><script>
document.getElementById("report").addEventListener("load", () => {{
  const page = document.getElementById("report").contentDocument;
  const images = Array.from(page.images);
  document.getElementById("result").textContent = JSON.stringify({{
    sections: Array.from(page.querySelectorAll("h2[id]")).map(h => h.id),
    images: images.length,
    broken: images.filter(i => !i.complete || i.naturalWidth === 0).length,
    summary: (page.getElementById("summary") || {{}}).textContent || "",
    scripts: page.scripts.length,
  }});
}});
</script></body></html>"""


def render_in_chromium(page: Path, screenshot: Path | None = None) -> tuple[dict, str]:
    """Open `page` in headless Chromium (inside a checking page on the same file origin): what the page shows,
    and Chromium's log (console messages are logged as INFO:CONSOLE)."""
    checker = page.with_name(f"check-{page.name}")
    checker.write_text(CHECK_PAGE.format(src=page.name))
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
              "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run(common + ["--dump-dom", checker.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found, f"chromium produced no result: {done.stderr[-2000:]}"
    if screenshot is not None:
        subprocess.run(common + ["--hide-scrollbars", f"--screenshot={screenshot}", "--window-size=1280,1400",
                                 page.as_uri()], capture_output=True, timeout=120, check=True)
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")), done.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")
@pytest.mark.parametrize("build, sections", [
    (_evaluation, ["confusion", "per-class", "mistakes", "calibration", "ood"]),
    (_audit, ["unreadable", "duplicates", "label-errors", "classes", "outliers"]),
])
def test_chromium_renders_the_report_with_its_sections_and_thumbnails(tmp_path, build, sections):
    page = build(tmp_path)
    shown, log = render_in_chromium(page, tmp_path / "shot.png")
    assert shown["sections"] == sections
    assert shown["images"] >= 2 and shown["broken"] == 0 and shown["scripts"] == 0
    assert shown["summary"].strip()
    console = [line for line in log.splitlines() if "CONSOLE" in line and page.name in line]
    assert not console, console
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_train_warns_once_per_problem_about_copies_across_splits(tmp_path):
    paths = _images(tmp_path / "data", 3)
    copy = tmp_path / "data" / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    splits = Splits(train=[ImageRecord(path=paths[0], label="a"), ImageRecord(path=paths[1], label="b")],
                    val=[ImageRecord(path=copy, label="a")], test=[ImageRecord(path=paths[2], label="b")])
    lines: list[str] = []
    warn_before_training(splits, [SkippedImage(path=tmp_path / "bad.png", reason="truncated")], lines.append)
    assert len(lines) == 3
    assert "1 unreadable" in lines[0] and "1 images appear byte-identical in two splits" in lines[1]
    assert "transfer-serve audit" in lines[2]
    lines.clear()
    warn_before_training(Splits(train=splits.train, val=[], test=splits.test), [], lines.append)
    assert lines == []
