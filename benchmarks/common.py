"""Helpers shared by the benchmarks: artifacts to measure, synthetic photos, machine description, timing, tables."""

from __future__ import annotations

import io
import os
import platform
import time
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

LIBRARIES = ("torch", "torchvision", "timm", "onnxruntime", "onnxruntime-gpu", "bentoml", "pyarrow", "pillow", "ray")


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


def jpeg_payloads(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct 320x240 JPEGs (smooth gradients + noise, so they decode like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    payloads = []
    for _ in range(count):
        colour = rng.uniform(0, 255, size=(3, 1, 1))
        angle = rng.uniform(0, np.pi)
        ramp = (np.cos(angle) * x + np.sin(angle) * y) / 400.0
        pixels = colour * (0.5 + 0.5 * np.sin(ramp * rng.uniform(2, 12))) + rng.normal(0, 12, size=(3, 240, 320))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(buffer, "JPEG", quality=90)
        payloads.append(buffer.getvalue())
    return payloads


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """`jpeg_payloads(count)` as files `img_000000.jpg`, ... in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, payload in enumerate(jpeg_payloads(count, seed)):
        (folder / f"img_{i:06d}.jpg").write_bytes(payload)


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
