"""Training configuration: every option of `transfer-serve train`, validated in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.ood import DEFAULT_METHOD, DEFAULT_TARGET_REJECTION, OODMethod
from models.preprocessing import Preprocessing
from models.registry import DEFAULT_BACKBONE, get_spec

Strategy = Literal["linear-probe", "finetune", "discriminative", "gradual"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="Image folder (one sub-folder per class) or CSV manifest (path,label[,split]).")
    output: Path = Field(description="Run directory: checkpoints, splits, metrics and the exported artifact.")
    backbone: str = Field(default=DEFAULT_BACKBONE, description="Backbone name (see `transfer-serve backbones`).")
    weights: str = Field(default="imagenet", description="'imagenet', 'none' (random init) or a state-dict file.")
    strategy: Strategy = Field(default="discriminative", description="linear-probe | finetune | discriminative | gradual.")
    epochs: int = Field(default=8, ge=1, description="Most epochs to train (early stopping may end sooner).")
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=2e-3, gt=0, description="Learning rate of the head; lower groups get less.")
    lr_spread: float = Field(default=10.0, ge=1, description="Head LR / stem LR for discriminative and gradual.")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="adamw | sgd.")
    schedule: Literal["cosine", "onecycle"] = Field(default="cosine", description="cosine (with warm-up) | onecycle.")
    weight_decay: float = Field(default=0.01, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    dropout: float = Field(default=0.2, ge=0, lt=1, description="Dropout before the new head.")
    image_size: int | None = Field(default=None, gt=0, description="Input side in pixels; default: the backbone's.")
    horizontal_flip: bool = Field(default=True, description="Random horizontal flips (turn off for text, digits...).")
    class_weights: bool = Field(default=True, description="Weight the loss by inverse class frequency.")
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    seed: int = Field(default=0, description="Seed for the split, initialisation, shuffling and augmentation.")
    patience: int = Field(default=3, ge=1, description="Epochs without validation improvement before stopping.")
    workers: int = Field(default=2, ge=0, description="DataLoader worker processes that decode images.")
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

    def preprocessing(self) -> Preprocessing:
        """The backbone's pretrained preprocessing at this run's image size: what training and export use."""
        pretrained = get_spec(self.backbone).preprocessing
        return pretrained.with_image_size(self.image_size or pretrained.image_size)
