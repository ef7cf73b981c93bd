"""Which candidate a run exports: each candidate's accuracy estimated on the same held-out images; a costlier
candidate wins only when it is right on at least `MIN_LEAD_IMAGES` more of them than the cheaper one, else the
cheaper one (the probe: nothing chose it among steps, it cannot overfit a step count) is kept.

A one-image lead is no evidence (one discordant pair), and on small validation splits it was measured to mislead:
on 2026-12-06 (docs/TRAINING.md, "Selection: a lead of two images"), the two runs with the L2-normalised probe in
which the fine-tune led by one image (of 3 and of 15 validation photos: hymenoptera and monkeys, 10 per class)
tested 4.6 and 8.1 points below the probe, while on the digits its lead was 3-5 images of 30 (and 11-20 of 270) and
it tested 5-14 points above. Two-image leads with the earlier, weaker probe also misled (P1, P5: -3.3, -4.8); a
larger margin was not adopted because it would refuse a fine-tune that is 10 points better on a far domain whenever
the validation split holds 15 images or so.

The estimates are paired: the probe is fitted on the train split alone and scored on the validation split, the
fine-tune's selection run trains on the train split and is scored on the same images. With at least
`--min-val-images` validation images the fine-tune's estimate is its best validation (of ~10: slightly
optimistic, which the lead rule partly offsets); below that, the fine-tune validates once, at the end of its
run, so nothing is chosen on those few images but the candidate itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from models.network import HeadInput

CandidateName = Literal["probe", "finetune"]
CANDIDATE_ORDER: tuple[CandidateName, ...] = ("probe", "finetune")
"""Cheapest first: a later candidate must lead the one kept by `MIN_LEAD_IMAGES` to replace it."""


class CandidateEstimate(BaseModel):
    """One candidate's held-out estimate, and what it rests on."""

    candidate: CandidateName
    accuracy: float | None
    """Accuracy on the validation split (None: no held-out image to estimate it on)."""
    images: int
    """Validation images the estimate rests on."""
    how: str
    cv_accuracy: float | None = None
    """The probe's k-fold cross-validated accuracy on the train split (what chose its C)."""
    head_input: HeadInput = "embedding"
    """What the candidate's classification layer sees (`models.network.HeadInput`): the probe's, since 2026-12-06,
    the L2-normalised embedding; runs saved before that lack the field, and their probe's head (standardisation
    folded into its weights) reads the embedding as it is."""


class Selection(BaseModel):
    """The candidate a run exports, and every candidate's estimate."""

    chosen: CandidateName
    estimates: list[CandidateEstimate]

    @property
    def head_input(self) -> HeadInput:
        """What the exported network's classification layer sees: the chosen candidate's."""
        return next(e.head_input for e in self.estimates if e.candidate == self.chosen)

    def describe(self) -> str:
        parts = [f"{e.candidate} {e.accuracy:.4f}" if e.accuracy is not None else f"{e.candidate} (no estimate)"
                 for e in self.estimates]
        images = max((e.images for e in self.estimates), default=0)
        return f"chosen: {self.chosen} (validation accuracy on {images} images: {', '.join(parts)})"


MIN_LEAD_IMAGES = 2
"""Validation images a costlier candidate must be right on beyond the cheaper one's count to be chosen."""


def choose(estimates: list[CandidateEstimate]) -> Selection:
    """Candidates cheapest first: a later one replaces the one kept so far when it is right on at least
    `MIN_LEAD_IMAGES` more validation images (or when the one kept has no estimate and it has)."""
    ordered = sorted(estimates, key=lambda e: CANDIDATE_ORDER.index(e.candidate))
    kept = ordered[0]
    for other in ordered[1:]:
        if other.accuracy is None:
            continue
        if kept.accuracy is None or _correct(other) - _correct(kept) >= MIN_LEAD_IMAGES:
            kept = other
    return Selection(chosen=kept.candidate, estimates=estimates)


def _correct(estimate: CandidateEstimate) -> int:
    """Validation images the candidate classified right."""
    return round((estimate.accuracy or 0.0) * estimate.images)
