"""How an artifact runs: the inference options a user may ask for, and the one rule that turns them into a
concrete runtime, device and precision.

The HTTP service (`service.settings`), the batch job (`extraction.config`), the CLI and the benchmarks all
resolve their options through `resolve_inference`, so they always agree on what `auto` means and on which
combinations are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RuntimeName = Literal["auto", "onnx", "torchscript"]
DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "fp16", "bf16"]
ConcreteRuntime = Literal["onnx", "torchscript"]
ConcreteDevice = Literal["cpu", "cuda"]

DEFAULT_TOP_K = 5
"""Labels kept per image when the caller does not say (the service's `top_k`, the job's `--top-k`)."""


def cap_top_k(k: int, num_classes: int) -> int:
    """The number of labels actually returned for a request of `k`: at least 1, at most every class."""
    return max(1, min(k, num_classes))


class DeviceError(RuntimeError):
    """The device asked for is not available here."""


class InferenceOptionsError(ValueError):
    """A combination of inference options that can never run (e.g. ONNX in reduced precision)."""


def check_combination(runtime: str, precision: str) -> None:
    """Refuse what no machine can run: reduced precision is a TorchScript mode (ONNX runs fp32). Runs once, where
    options are parsed (`InferenceFields`); everything downstream takes the parsed fields as they are."""
    if runtime == "onnx" and precision != "fp32":
        raise InferenceOptionsError(f"precision {precision} needs the torchscript runtime, not onnx (ONNX runs fp32)")


class InferenceFields(BaseModel):
    """The `runtime`, `device` and `precision` fields with their one consistency check, for every configuration
    that runs a model (`InferenceOptions`, the service's settings, the extraction job's config)."""

    runtime: RuntimeName = Field("auto", description="auto (torchscript for fp16/bf16, else fastest measured on the device) | onnx | torchscript.")
    device: DeviceName = Field("auto", description="auto (cuda when a GPU is present) | cpu | cuda.")
    precision: Precision = Field("fp32", description="fp16/bf16 need the torchscript runtime.")

    @model_validator(mode="after")
    def _possible_combination(self) -> "InferenceFields":
        check_combination(self.runtime, self.precision)
        return self

    def inference_options(self) -> "InferenceOptions":
        """These fields alone (already checked: not validated again), e.g. to ship to another process."""
        return InferenceOptions.model_construct(runtime=self.runtime, device=self.device, precision=self.precision)


class InferenceOptions(InferenceFields):
    """What a user asks for: runtime, device and precision, each possibly `auto`."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ResolvedInference(BaseModel):
    """What actually runs: a concrete runtime, device and precision (no `auto`). Built by `resolve_inference` from
    options whose combination was checked when they were parsed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: ConcreteRuntime
    device: ConcreteDevice
    precision: Precision

    def as_options(self) -> InferenceOptions:
        """The same choice as options (to ship to another process, which resolves it again there)."""
        return InferenceOptions(runtime=self.runtime, device=self.device, precision=self.precision)


def cuda_is_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: DeviceName, cuda_available: bool | None = None) -> ConcreteDevice:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; 'cuda' without a GPU is a `DeviceError`."""
    available = cuda_is_available() if cuda_available is None else cuda_available
    if device == "auto":
        return "cuda" if available else "cpu"
    if device == "cuda" and not available:
        raise DeviceError("device 'cuda' was asked for, but no CUDA GPU is available")
    return device


def fastest_runtime(device: ConcreteDevice) -> ConcreteRuntime:
    """The fastest fp32 runtime measured on each device (docs/BENCHMARKS.md): ONNX Runtime on CPU."""
    return "onnx" if device == "cpu" else "torchscript"


def resolve_inference(options: InferenceFields, cuda_available: bool | None = None) -> ResolvedInference:
    """The one rule: auto device -> cuda when available, else cpu; auto runtime -> torchscript for fp16/bf16
    (a TorchScript mode), else the fastest measured on the device. Raises `DeviceError` for cuda without a
    GPU and `InferenceOptionsError` for combinations no machine runs. `cuda_available` defaults to this
    process's torch; a caller deciding for other machines (Ray actors) passes its own answer."""
    device = resolve_device(options.device, cuda_available)
    if options.runtime != "auto":
        runtime: ConcreteRuntime = options.runtime
    elif options.precision != "fp32":
        runtime = "torchscript"
    else:
        runtime = fastest_runtime(device)
    return ResolvedInference(runtime=runtime, device=device, precision=options.precision)
