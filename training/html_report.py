"""The two HTML reports a person opens: `audit.html` (`transfer-serve audit`) and `evaluation.html`
(`evaluate`, and the test split of every training run). One self-contained file each: images are small
inline JPEG thumbnails (data: URIs), charts are inline SVG, no script, font or stylesheet is fetched, so a
report opens offline and can be mailed.

Everything that comes from the data (file names, labels) goes through Jinja2's autoescaping, and the page's
Content-Security-Policy allows no script at all and images only from data: URIs, so a label named
`<script>` is shown as text and could not run even if it slipped through. Lists are capped
(`MAX_PER_SECTION`) and the page says so.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

import jinja2
import numpy as np
from markupsafe import Markup
from pydantic import BaseModel

from models.decoding import ImageDecodeError, load_image
from models.files import atomic_write_text
from training.audit.schema import AuditReport

MAX_PER_SECTION = 100
THUMBNAIL_SIDE = 96
RELIABILITY_BINS = 10


def thumbnail(path: str | Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A JPEG data: URI of the image at most `side` px (decoded by the one decoding function), or None."""
    try:
        image = load_image(path)
    except ImageDecodeError:
        return None
    image.thumbnail((side, side))
    if min(image.size) < side // 2:  # tiny images (8x8 digits) shown at a visible size, pixels kept sharp
        scale = side // max(image.size)
        image = image.resize((image.width * max(1, scale), image.height * max(1, scale)), resample=0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def reliability_svg(probabilities: np.ndarray, targets: np.ndarray, bins: int = RELIABILITY_BINS) -> Markup:
    """Reliability diagram as inline SVG: accuracy per confidence bin against the diagonal (built from numbers
    only, so it is safe markup)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    which = np.clip((confidence * bins).astype(int), 0, bins - 1)
    size, pad = 260, 30
    plot = size - 2 * pad
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
             'aria-label="reliability diagram">',
             f'<rect x="{pad}" y="{pad}" width="{plot}" height="{plot}" fill="#fafafa" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad + plot}" x2="{pad + plot}" y2="{pad}" stroke="#999" stroke-dasharray="4"/>']
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        accuracy = float(correct[members].mean())
        height = accuracy * plot
        parts.append(f'<rect x="{pad + b * plot / bins + 1:.1f}" y="{pad + plot - height:.1f}" '
                     f'width="{plot / bins - 2:.1f}" height="{height:.1f}" fill="#4a7bd0">'
                     f'<title>confidence {b / bins:.1f}-{(b + 1) / bins:.1f}: accuracy {accuracy:.3f}, '
                     f'{int(members.sum())} images</title></rect>')
    parts.append(f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle" font-size="11">confidence</text>')
    parts.append(f'<text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" '
                 'text-anchor="middle">accuracy</text></svg>')
    return Markup("".join(parts))


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("training", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_ENVIRONMENT.filters["thumb"] = thumbnail


def _render(template: str, path: Path, **context) -> Path:
    html = _ENVIRONMENT.get_template(template).render(cap=MAX_PER_SECTION, **context)
    atomic_write_text(path, html)
    return path


def write_audit_html(report: AuditReport, path: Path) -> Path:
    return _render("audit.html.j2", Path(path), report=report)


def write_evaluation_html(
    report: BaseModel,
    paths: Sequence[Path],
    probabilities: np.ndarray,
    targets: np.ndarray,
    path: Path,
    ood_scores: np.ndarray | None = None,
    title: str = "Evaluation",
) -> Path:
    """`evaluation.html` of a `training.evaluate.EvaluationReport` (typed by its base class: evaluate calls this
    module, so this module does not import evaluate): the report's figures plus the worst mistakes (wrong, most confident first) as
    thumbnails, the reliability diagram and, with OOD scores, the most and least unusual images."""
    targets = np.asarray(targets)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != targets)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    mistakes = [dict(path=paths[i], true=report.labels[targets[i]], predicted=report.labels[predicted[i]],
                     probability=float(probabilities[i, predicted[i]])) for i in wrong[:MAX_PER_SECTION]]
    unusual: dict[str, list[dict]] = {}
    if ood_scores is not None:
        finite = np.flatnonzero(np.isfinite(ood_scores))
        ranked = finite[np.argsort(-ood_scores[finite], kind="stable")]
        show = min(len(ranked) // 2, 12)
        unusual = {
            "most unusual": [dict(path=paths[i], label=report.labels[targets[i]], score=float(ood_scores[i]))
                             for i in ranked[:show]],
            "least unusual": [dict(path=paths[i], label=report.labels[targets[i]], score=float(ood_scores[i]))
                              for i in ranked[::-1][:show]],
        }
    matrix = np.array(report.confusion_matrix)
    return _render("evaluation.html.j2", Path(path), report=report, title=title, mistakes=mistakes,
                   mistakes_total=len(wrong), unusual=unusual, matrix=matrix.tolist(),
                   matrix_max=max(1, int(matrix.max())) if matrix.size else 1,
                   reliability=reliability_svg(probabilities, targets))
