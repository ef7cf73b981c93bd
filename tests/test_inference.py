"""One rule for runtime, device and precision: `serve` settings and `extract` options resolve identically on
every combination, and the rule itself says what `auto` means."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest
from pydantic import ValidationError

from extraction.config import ExtractionConfig, ExtractionError, RayOptions
from extraction.plan import resolve_execution
from models.inference import (
    DeviceError,
    DeviceName,
    InferenceOptions,
    Precision,
    ResolvedInference,
    RuntimeName,
    resolve_inference,
)
from service.settings import ServiceSettings

COMBINATIONS = list(
    itertools.product(get_args(RuntimeName), get_args(DeviceName), get_args(Precision), [True, False])
)


def serve_outcome(runtime: str, device: str, precision: str, cuda: bool) -> ResolvedInference | str:
    try:
        settings = ServiceSettings(runtime=runtime, device=device, precision=precision)
        return resolve_inference(settings.inference_options(), cuda_available=cuda)
    except (ValidationError, DeviceError) as exc:
        return f"refused: {type(exc).__name__}"


def extract_outcome(runtime: str, device: str, precision: str, cuda: bool, **extra) -> ResolvedInference | str:
    try:
        config = ExtractionConfig(artifact="a", input="i", output="o", runtime=runtime, device=device,
                                  precision=precision, **extra)  # fmt: skip
        return resolve_execution(config, cuda_available=cuda)
    except (ValidationError, ExtractionError) as exc:
        return f"refused: {type(exc).__name__}"


@pytest.mark.parametrize(("runtime", "device", "precision", "cuda"), COMBINATIONS)
def test_serve_and_extract_resolve_the_same_way(runtime, device, precision, cuda):
    served = serve_outcome(runtime, device, precision, cuda)
    extracted = extract_outcome(runtime, device, precision, cuda)
    assert isinstance(served, ResolvedInference) == isinstance(extracted, ResolvedInference), (served, extracted)
    if isinstance(served, ResolvedInference):
        assert served == extracted


@pytest.mark.parametrize(("runtime", "device", "precision", "cuda"), COMBINATIONS)
def test_the_ray_engine_resolves_as_a_machine_whose_gpus_are_the_actors(runtime, device, precision, cuda):
    ray = RayOptions(num_gpus=1.0 if cuda else 0.0)
    on_ray = extract_outcome(runtime, device, precision, None, engine="ray", ray=ray)  # type: ignore[arg-type]
    assert on_ray == extract_outcome(runtime, device, precision, cuda)


@pytest.mark.parametrize(
    ("options", "cuda", "expected"),
    [
        (dict(), False, ("onnx", "cpu", "fp32")),
        (dict(), True, ("torchscript", "cuda", "fp32")),
        (dict(precision="bf16"), False, ("torchscript", "cpu", "bf16")),  # not onnx: ONNX runs fp32 only
        (dict(precision="fp16"), True, ("torchscript", "cuda", "fp16")),
        (dict(runtime="onnx", device="cuda"), True, ("onnx", "cuda", "fp32")),
        (dict(runtime="torchscript", device="cpu"), True, ("torchscript", "cpu", "fp32")),
    ],
)
def test_auto_means_cuda_when_present_and_the_fastest_runtime(options, cuda, expected):
    resolved = resolve_inference(InferenceOptions(**options), cuda_available=cuda)
    assert (resolved.runtime, resolved.device, resolved.precision) == expected


def test_impossible_combinations_are_refused_with_the_reason():
    with pytest.raises(ValidationError, match="needs the torchscript runtime"):
        InferenceOptions(runtime="onnx", precision="fp16")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_inference(InferenceOptions(device="cuda"), cuda_available=False)
