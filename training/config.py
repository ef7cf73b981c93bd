"""Training configuration: every option of `transfer-serve train`, validated in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.registry import DEFAULT_BACKBONE

Strategy = Literal["linear-probe", "finetune", "discriminative", "gradual"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="Image folder (one sub-folder per class) or CSV manifest (path,label[,split]).")
    output: Path = Field(description="Run directory: checkpoints, splits, metrics and the exported artifact.")
    backbone: str = DEFAULT_BACKBONE
    weights: str = Field(default="imagenet", description="'imagenet', 'none' (random init) or a state-dict file.")
    strategy: Strategy = "discriminative"
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="Learning rate of the head; lower groups get less.")
    lr_spread: float = Field(default=100.0, ge=1, description="Head LR / stem LR for discriminative and gradual.")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "onecycle"] = "cosine"
    weight_decay: float = Field(default=0.01, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    image_size: int | None = Field(default=None, gt=0, description="Input side in pixels; default: the backbone's.")
    horizontal_flip: bool = True
    class_weights: bool = Field(default=True, description="Weight the loss by inverse class frequency.")
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    seed: int = 0
    patience: int = Field(default=3, ge=1, description="Epochs without validation improvement before stopping.")
    workers: int = Field(default=2, ge=0, description="DataLoader worker processes that decode images.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = False
    export: bool = True
    name: str | None = Field(default=None, description="Model name in the artifact; default: the data folder's name.")
