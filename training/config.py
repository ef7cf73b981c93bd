"""Training configuration: every option of `transfer-serve train`, validated in one place."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from models.ood import DEFAULT_METHOD, DEFAULT_TARGET_REJECTION, OODMethod
from models.preprocessing import Preprocessing
from models.registry import DEFAULT_BACKBONE, UnknownBackboneError, get_spec
from training.strategies import STRATEGIES, Strategy

AUTO_TEST_MIN_IMAGES = 100
"""With `test_fraction` left automatic, a test split is held out only when it would hold at least this many
images (15% of >= 667 images): below that its interval is too wide to be worth the labels it takes."""


def parse_duration(text: str | float | int | None) -> float | None:
    """'90s', '5m', '1h30m', '1.5m' or a number of seconds -> seconds; None, '', 'none', '0' -> None (no budget)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) if text > 0 else None
    text = text.strip().lower()
    if text in ("", "none", "off", "0"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text).strip():
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 5m, 1h30m)")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)
    return seconds if seconds > 0 else None


Duration = Annotated[float | None, BeforeValidator(parse_duration)]
"""Seconds (None: no limit), given as seconds or text that `parse_duration` reads: parsed once, on validation."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="Image folder (one sub-folder per class) or CSV manifest (path,label[,split]).")
    output: Path = Field(description="Run directory: checkpoints, splits, metrics and the exported artifact.")
    backbone: str = Field(default=DEFAULT_BACKBONE, description="Backbone name (see `transfer-serve backbones`).")
    weights: str = Field(default="imagenet", description="'imagenet', 'none' (random init) or a state-dict file.")
    strategy: Strategy = Field(default="discriminative", description=f"{' | '.join(STRATEGIES)}.")
    # --- the schedule: a budget in optimizer steps sized by the data -----------------------------------------
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps of the selection run (default: "
                              "sized by the data: clamp(budget_epochs x train images / batch, min_steps, max_steps)).")
    epochs: int | None = Field(default=None, ge=1, description="Legacy: train this many epochs instead of a step "
                               "budget, validating after each (the pre-2026-11-27 default was 8).")
    budget_epochs: float = Field(default=10.0, gt=0, description="Passes over the training split the step budget aims at.")
    min_steps: int = Field(default=200, ge=1, description="Fewest optimizer steps of an automatic budget.")
    max_steps: int = Field(default=300, ge=1, description="Most optimizer steps of an automatic budget.")
    eval_every: int | None = Field(default=None, ge=1, description="Validate every N steps (default: 10 times a run).")
    time_budget: Duration = Field(default="5m", validate_default=True, description="Fit steps and training resolution into this wall time "
                                    "(e.g. 90s, 5m; 'none': no limit), from a measured speed probe.")
    refit: bool = Field(default=True, description="After choosing the step count on validation, retrain on "
                        "train+val for that many steps (scaled to the larger set) and export that model.")
    min_val_images: int = Field(default=50, ge=1, description="With fewer validation images than this, a chosen step "
                                "count would be noise: the fine-tune's step count is not chosen on validation (one "
                                "validation at the end of its run, to compare it with the probe); with --candidate "
                                "finetune, no selection run: every labelled image trains for the budget's steps.")
    candidate: Literal["auto", "probe", "finetune"] = Field(
        default="auto", description="What the run exports: auto (the probe or the fine-tune, whichever scores higher "
        "on the validation split), probe (a linear head on the frozen backbone, C by k-fold cross-validation) or "
        "finetune.")
    # --- the recipe ------------------------------------------------------------------------------------------
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="Learning rate of the head; lower groups get less.")
    lr_spread: float = Field(default=6.0, ge=1, description="Head LR / stem LR for discriminative and gradual "
                             "(6 = a decay of 0.7 per layer group over 5 backbone groups).")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="adamw | sgd.")
    schedule: Literal["cosine", "onecycle"] = Field(default="cosine", description="cosine (with warm-up) | onecycle.")
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1, description="Linear warm-up over this share of the steps.")
    weight_decay: float = Field(default=0.05, ge=0, description="Weight decay of weights (not of norms and biases).")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    dropout: float = Field(default=0.2, ge=0, lt=1, description="Dropout before the new head.")
    freeze_bn: bool = Field(default=True, description="Keep every BatchNorm layer's ImageNet running statistics "
                            "(eval mode) while fine-tuning; its scale and shift still train.")
    image_size: int | None = Field(default=None, gt=0, description="Serving input side in pixels (what the artifact "
                                   "preprocesses to); default: the backbone's.")
    train_image_size: int | None = Field(default=None, gt=0, description="Training crop side (default: ~0.7 x the "
                                         "serving side, at least 128 and at most the serving side; FixRes).")
    crop_min_scale: float = Field(default=0.35, gt=0, le=1, description="Smallest area share of a random resized crop.")
    horizontal_flip: bool = Field(default=True, description="Random horizontal flips (turn off for text, digits...).")
    trivial_augment: bool = Field(default=False, description="Add TrivialAugmentWide to the training augmentation.")
    class_weights: bool = Field(default=True, description="Weight the loss by inverse class frequency.")
    # --- splits ------------------------------------------------------------------------------------------------
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float | None = Field(default=None, ge=0, lt=0.5, description="Held-out test share (default: 0.15 "
                                        f"when that is >= {AUTO_TEST_MIN_IMAGES} images, else no test split; 0: none).")
    seed: int = Field(default=0, description="Seed for the split, initialisation, shuffling and augmentation.")
    patience: int = Field(default=5, ge=1, description="Validations without improvement before stopping.")
    workers: int = Field(default=2, ge=0, description="Threads that decode images (once, into the in-memory cache).")
    threads: int | None = Field(default=None, ge=1, description="CPU threads for training (default: the faster of 1 "
                                "and all, measured by the speed probe; a busy shared CPU often trains faster with 1).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto | cpu | cuda.")
    resume: bool = Field(default=False, description="Continue the run in --output from its last checkpoint.")
    export: bool = Field(default=True, description="Export the artifact at the end.")
    name: str | None = Field(default=None, description="Model name in the artifact; default: the data folder's name.")
    ood_method: OODMethod | Literal["none"] = Field(
        default=DEFAULT_METHOD,
        description="Out-of-distribution score fitted on the validation split (knn | mahalanobis | energy | msp; "
        "'none': no detector). See docs/OOD.md.",
    )
    ood_target_rejection: float = Field(
        default=DEFAULT_TARGET_REJECTION, ge=0, lt=1,
        description="Share of in-distribution images the OOD threshold flags as unknown.",
    )

    audit: bool = Field(default=True, description="Before training, warn (one line each) about unreadable files and "
                        "byte-identical images in two splits; `transfer-serve audit` checks the rest (--no-audit: skip).")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        """Resolved once here (a registry name or timm/<name>), so a typo fails before any image is read."""
        try:
            get_spec(value)
        except UnknownBackboneError as exc:
            raise ValueError(str(exc)) from None
        return value

    def preprocessing(self) -> Preprocessing:
        """The backbone's pretrained preprocessing at the serving image size: what evaluation and export use."""
        pretrained = get_spec(self.backbone).preprocessing
        return pretrained.with_image_size(self.image_size or pretrained.image_size)

    def default_train_image_size(self) -> int:
        serve = self.preprocessing().image_size
        return min(serve, max(128, 32 * round(0.7 * serve / 32)))

    def budget_steps(self, train_images: int) -> int:
        """Steps of the selection run before any time budget: --steps, --epochs, or clamp(k * n / batch)."""
        per_epoch = math.ceil(train_images / min(self.batch_size, train_images))
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * per_epoch
        wanted = math.ceil(self.budget_epochs * train_images / self.batch_size)
        return int(min(self.max_steps, max(self.min_steps, wanted)))

    def evaluation_interval(self, steps: int, train_images: int) -> int:
        if self.eval_every is not None:
            return self.eval_every
        if self.epochs is not None and self.steps is None:
            return math.ceil(train_images / min(self.batch_size, train_images))
        return max(1, math.ceil(steps / 10))


LEGACY_OPTIONS = dict(
    epochs=8, lr=2e-3, lr_spread=10.0, weight_decay=0.01, patience=3, freeze_bn=False, refit=False,
    test_fraction=0.15, crop_min_scale=0.5, warmup_fraction=0.1, time_budget="none", min_val_images=1,
)
"""The defaults before 2026-11-27 (with `train_image_size` = the serving size, set by `legacy_options`)."""


def legacy_options(image_size: int | None = None, backbone: str = DEFAULT_BACKBONE) -> dict:
    serve = image_size or get_spec(backbone).preprocessing.image_size
    return LEGACY_OPTIONS | {"train_image_size": serve}
