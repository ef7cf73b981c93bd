"""Which candidate a run exports: each candidate's accuracy estimated on the same held-out images, the best
one wins, a tie goes to the cheaper (the probe: nothing chose it among steps, it cannot overfit a step count).

The estimates are paired: the probe is fitted on the train split alone and scored on the validation split, the
fine-tune's selection run trains on the train split and is scored on the same images. With at least
`--min-val-images` validation images the fine-tune's estimate is its best validation (of ~10: slightly
optimistic, which the tie rule partly offsets); below that, the fine-tune validates once, at the end of its
run, so nothing is chosen on those few images but the candidate itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from models.network import HeadInput

CandidateName = Literal["probe", "finetune"]
CANDIDATE_ORDER: tuple[CandidateName, ...] = ("probe", "finetune")
"""Cheapest first: a tie goes to the earlier."""


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


def choose(estimates: list[CandidateEstimate]) -> Selection:
    """The candidate with the highest estimate; a tie, or no estimate at all, goes to the cheapest."""
    ranked = sorted(estimates, key=lambda e: (-(e.accuracy if e.accuracy is not None else -1.0),
                                               CANDIDATE_ORDER.index(e.candidate)))
    return Selection(chosen=ranked[0].candidate, estimates=estimates)
