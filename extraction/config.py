"""The batch extraction job's options: `ExtractionConfig` (every option of `transfer-serve extract`),
`RayOptions`, and the job's own error type."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.inference import DEFAULT_TOP_K, InferenceFields
from models.decoding import DEFAULT_MAX_PIXELS

EmbeddingDType = Literal["float32", "float16"]
EngineName = Literal["local", "ray"]


class ExtractionError(ValueError):
    """The extraction job cannot run as asked; the message says what to change."""


class RayOptions(BaseModel):
    """How `--engine ray` spreads the job: inference actors, their GPUs, and the decoding tasks."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(default=1, ge=1, description="Inference actors (each holds one loaded runtime).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per inference actor (0: run on CPU).")
    cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs reserved per inference actor.")
    decode_cpus: float = Field(default=1.0, gt=0, description="CPUs per decoding task.")
    local_num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of a local Ray started by the job (ignored when joining RAY_ADDRESS)."
    )


class ExtractionConfig(InferenceFields):
    """Every option of `transfer-serve extract`, validated in one place."""

    model_config = ConfigDict(extra="forbid")

    artifact: Path = Field(description="Artifact directory (manifest.json, model.onnx, model.ts).")
    input: Path = Field(description="Image folder (searched recursively), or a .csv / .parquet manifest with a 'path' column.")
    output: Path = Field(description="Output folder for the Parquet shards, errors and summary.")
    batch_size: int = Field(default=64, ge=1, description="Images per forward pass.")
    shard_size: int = Field(default=4096, ge=1, description="Images per Parquet shard (the unit of resume).")
    workers: int = Field(default=2, ge=0, description="Local engine: image-decoding worker processes (0: in-process).")
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, description="Labels kept per image (capped at the number of classes).")
    embedding_dtype: EmbeddingDType = "float32"
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0, description="Larger images are recorded as errors.")
    engine: EngineName = "local"
    ray: RayOptions = Field(default_factory=RayOptions)
    show_progress: bool = True

    def cuda_available(self) -> bool | None:
        """Whether the inference processes have a GPU: on Ray, when actors get GPUs (`ray.num_gpus > 0`; the
        driver may have none); locally, None (ask this process's torch)."""
        return self.ray.num_gpus > 0 if self.engine == "ray" else None
