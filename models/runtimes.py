"""Inference runtimes for an exported artifact: TorchScript and ONNX Runtime.

Both take a float32 NCHW batch (from `models.preprocessing.preprocess_batch`) and return float32
`(logits, embedding)` arrays, so the service and the batch job can switch runtime by configuration.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from models.artifact import Artifact
from models.inference import Precision, ResolvedInference

logger = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.95
"""fp16/bf16 TorchScript is refused at load when it picks fp32's top-1 class on fewer check inputs than this."""


class PrecisionError(RuntimeError):
    """Reduced precision changes the model's answers too often to be served."""


class Runtime(Protocol):
    name: str
    device: str

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> dict[str, str]: ...


class TorchScriptRuntime:
    name = "torchscript"

    def __init__(
        self,
        artifact: Artifact,
        device: str = "cpu",
        precision: Precision = "fp32",
        min_top1_agreement: float = MIN_TOP1_AGREEMENT,
    ) -> None:
        self.device = device
        self.precision = precision
        module = torch.jit.load(str(artifact.torchscript_path), map_location=device).eval()
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        if self._dtype is not torch.float32:
            module = module.to(self._dtype)
        self._module = torch.jit.freeze(module) if device == "cpu" and precision == "fp32" else module
        self.top1_agreement: float | None = None
        if self._dtype is not torch.float32:
            self.top1_agreement = self._top1_agreement_with_fp32(artifact)
            logger.info("%s top-1 agreement with fp32: %.3f", precision, self.top1_agreement)
            if self.top1_agreement < min_top1_agreement:
                raise PrecisionError(
                    f"{precision} agrees with fp32 on the top-1 class for only {self.top1_agreement:.1%} of the "
                    f"check inputs (at least {min_top1_agreement:.0%} required); serve this model in fp32"
                )

    def _top1_agreement_with_fp32(self, artifact: Artifact, images: int = 16, seed: int = 0) -> float:
        """Fraction of a fixed, seeded batch of N(0, 1) inputs (the scale of normalised images) on which this
        reduced-precision module picks the same top-1 class as the fp32 module; non-finite outputs disagree."""
        size = artifact.manifest.preprocessing.image_size
        batch = np.random.default_rng(seed).standard_normal((images, 3, size, size)).astype(np.float32)
        reference = torch.jit.load(str(artifact.torchscript_path), map_location=self.device).eval()
        with torch.inference_mode():
            expected = reference(torch.from_numpy(batch).to(self.device))[0].argmax(1).cpu().numpy()
        logits, _ = self(batch)
        agree = (logits.argmax(1) == expected) & np.isfinite(logits).all(axis=1)
        return float(agree.mean())

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self._dtype, non_blocking=True)
        logits, embedding = self._module(inputs)
        return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    def describe(self) -> dict[str, str]:
        described = {"runtime": self.name, "device": self.device, "precision": self.precision}
        if self.top1_agreement is not None:
            described["top1_agreement_with_fp32"] = f"{self.top1_agreement:.3f}"
        return described


class OnnxRuntime:
    name = "onnx"

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.device = device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        available = set(ort.get_available_providers())
        providers = [p for p in wanted if p in available]
        self._session = ort.InferenceSession(str(artifact.onnx_path), options, providers=providers)
        self.providers = self._session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            logger.warning("ONNX Runtime has no CUDA provider here; running on %s", self.providers)
            self.device = "cpu"
        logger.info("ONNX Runtime providers in use: %s", self.providers)
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return logits, embedding

    def describe(self) -> dict[str, str]:
        return {"runtime": self.name, "device": self.device, "providers": ",".join(self.providers)}


def load_runtime(artifact: Artifact, inference: ResolvedInference) -> Runtime:
    """Load the artifact's model file for the resolved runtime, device and precision."""
    if inference.runtime == "onnx":
        return OnnxRuntime(artifact, inference.device)
    return TorchScriptRuntime(artifact, inference.device, inference.precision)
