"""Helpers shared by the benchmarks: artifacts to measure, machine description, timing, tables."""

from __future__ import annotations

import os
import platform
import time
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

LIBRARIES = ("torch", "torchvision", "timm", "onnxruntime", "onnxruntime-gpu", "bentoml", "pyarrow", "pillow")


def versions() -> str:
    found = [f"python {platform.python_version()}"]
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def machine(device: str = "cpu") -> str:
    described = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    if device == "cuda" and torch.cuda.is_available():
        described += f", GPU {torch.cuda.get_device_name()}"
    try:
        load = os.getloadavg()
        described += f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    except OSError:
        pass
    return f"{described}; {versions()}; {date.today().isoformat()}"


def export_model(folder: Path, backbone: str, weights: str, num_classes: int = 10, image_size: int | None = None) -> Path:
    """Export `backbone` (TorchScript + ONNX artifact, with a 10-class head) into `folder/artifact`."""
    from models.network import build_network
    from models.registry import get_spec
    from training.export import export_artifact

    spec = get_spec(backbone)
    preprocessing = spec.preprocessing.with_image_size(image_size or spec.preprocessing.image_size)
    size = preprocessing.image_size
    torch.manual_seed(0)
    model = build_network(spec.name, num_classes=num_classes, weights=weights).eval()
    output = folder / "artifact"
    export_artifact(
        model,
        labels=[f"class_{i}" for i in range(num_classes)],
        backbone=spec.name,
        preprocessing=preprocessing,
        parity_batch=torch.randn(2, 3, size, size),
        output=output,
        name="benchmark",
        version="benchmark",
    )
    return output


def timed(step: Callable[[], object], min_iters: int, min_seconds: float, warmup: int = 1,
          sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per call of `step`: `warmup` untimed calls, then at least `min_iters` calls and `min_seconds`."""
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
