"""Helpers shared by the benchmarks: artifacts to measure, synthetic photos (320x240 and 12-megapixel), machine
description, timing, tables."""

from __future__ import annotations

import io
import os
import platform
import shutil
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


TWELVE_MP = (4032, 3024)
"""A 12-megapixel phone camera's frame (4:3)."""

PHOTO_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
"""Real photos (the shared ants-vs-bees set, `../shared` from the project root), when present."""


def photo_12mp_source() -> str:
    """Where `photo_12mp_payloads` takes its content from, in words."""
    if _real_photos():
        return f"real photos from {PHOTO_DIR.name}/val, upscaled (bicubic) to 4032x3024 with luminance grain"
    return "smooth synthetic scenes (the hymenoptera photos are absent), upscaled to 4032x3024 with luminance grain"


def _real_photos() -> list[Path]:
    return sorted(PHOTO_DIR.glob("val/*/*.jpg")) if PHOTO_DIR.is_dir() else []


def _synthetic_scene(rng: np.random.Generator, size: tuple[int, int] = (504, 378)):
    """A smooth low-resolution scene: a sky-to-ground gradient and a few soft blobs (no noise)."""
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    top, bottom = rng.uniform(0, 255, size=(2, 3))
    pixels = top[:, None, None] + (bottom - top)[:, None, None] * (y / height)[None]
    for _ in range(6):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        pixels += (rng.uniform(0, 255, size=3)[:, None, None] - pixels) * blob[None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def photo_12mp_payloads(count: int, seed: int = 0, size: tuple[int, int] = TWELVE_MP, quality: int = 92,
                        grain: float = 4.0) -> list[bytes]:
    """`count` distinct 12-megapixel JPEGs (4032x3024, about 3 MB each) that decode like camera photos.

    Content: real photos (`PHOTO_DIR`, chosen with `seed`) centre-cropped to 4:3, or smooth synthetic scenes
    when they are absent; upscaled with bicubic interpolation, plus Gaussian luminance grain of `grain` grey
    levels (a camera's sensor noise: without it an upscaled photo compresses to half a camera file's size,
    and the entropy decoding that every JPEG decode pays, at any DCT scale, would be understated); JPEG
    quality `quality`, 4:2:0 chroma like a phone's. About 1 s per image to make."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _real_photos()
    chosen = [photos[i] for i in rng.permutation(len(photos))[:count]] if photos else []
    width, height = size
    payloads = []
    for i in range(count):
        if i < len(chosen):
            with Image.open(chosen[i]) as opened:
                source = opened.convert("RGB")
            crop_w = min(source.width, source.height * width // height)
            crop_h = min(source.height, source.width * height // width)
            left, top = (source.width - crop_w) // 2, (source.height - crop_h) // 2
            source = source.crop((left, top, left + crop_w, top + crop_h))
        else:
            source = _synthetic_scene(rng)
        pixels = np.asarray(source.resize(size, Image.BICUBIC), dtype=np.int16)
        noise = rng.standard_normal((height, width), dtype=np.float32) * np.float32(grain)
        pixels = pixels + noise.astype(np.int16)[:, :, None]
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality, subsampling=2)
        payloads.append(buffer.getvalue())
    return payloads


def write_payloads(folder: Path, payloads: list[bytes], count: int) -> None:
    """`count` files `img_000000.jpg`, ... in `folder`, cycling through `payloads` (a file's decode cost is its
    content's, so a few distinct 12 MP photos make any number of files cheaply)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"img_{i:06d}.jpg").write_bytes(payloads[i % len(payloads)])


def with_decode(artifact: Path, decode: str, output: Path) -> Path:
    """A copy of `artifact` at `output` whose manifest's `preprocessing.decode` is `decode` ("full": every pixel
    decoded, what artifacts exported before 2026-11-27 record; "reduced": the new default): the same network,
    so the two copies isolate the decode path. Editing manifest.json changes the artifact's digest (the hash of
    that file) but not the files it lists, which still verify, so the copy loads (checked here)."""
    from models.artifact import load_artifact, read_manifest, write_manifest

    shutil.copytree(artifact, output)
    manifest = read_manifest(output)
    preprocessing = manifest.preprocessing.model_copy(update={"decode": decode})
    write_manifest(output, manifest.model_copy(update={"preprocessing": preprocessing}))
    loaded = load_artifact(output)
    assert loaded.manifest.preprocessing.decode == decode
    return output


def decode_rows(payloads: list[bytes], artifacts: dict[str, Path], min_seconds: float) -> list[list[object]]:
    """Per image, one thread, for each labelled artifact's preprocessing: `load_image` alone (the decode, with
    the size it returns) and `load_image` + resize + normalise (what a server or decoding worker does before
    inference)."""
    from models.artifact import load_artifact
    from models.decoding import load_image
    from models.preprocessing import preprocess_batch

    rows = []
    for label, artifact in artifacts.items():
        p = load_artifact(artifact).manifest.preprocessing
        decode = cpu_per_call(lambda: [load_image(x, preprocessing=p) for x in payloads], 2, min_seconds)
        size = load_image(payloads[0], preprocessing=p).size
        full = cpu_per_call(lambda: preprocess_batch([load_image(x, preprocessing=p) for x in payloads], p), 2,
                            min_seconds)
        n = len(payloads)
        rows.append([label, f"{size[0]}x{size[1]}", f"{decode[0] / n * 1e3:.1f}", f"{decode[1] / n * 1e3:.1f}",
                     f"{full[0] / n * 1e3:.1f}", f"{full[1] / n * 1e3:.1f}", f"{n / full[0]:.1f}"])
    return rows


DECODE_HEADERS = ["decode path (one thread)", "decoded size", "decode wall ms/image", "decode CPU ms/image",
                  "+ resize + normalise: wall ms/image", "CPU ms/image", "images/s"]


def dct_scale_rows(payloads: list[bytes], min_seconds: float) -> list[list[object]]:
    """Decode alone at each libjpeg DCT scale (Pillow's draft mode, no box reduction), one thread: what a JPEG
    costs at 1/1 ("full"), 1/4 (what "reduced" picks for 4032x3024 at 224 px: the shorter side must stay >= 448)
    and 1/8. Every scale pays the same entropy (Huffman) decoding of the whole file; only the inverse DCT,
    upsampling and colour conversion shrink."""
    from PIL import Image

    width, height = Image.open(io.BytesIO(payloads[0])).size
    rows = []
    for scale in (1, 2, 4, 8):
        def decode() -> None:
            for payload in payloads:
                with Image.open(io.BytesIO(payload)) as image:
                    image.draft("RGB", (width // scale, height // scale))
                    image.load()

        wall, cpu = cpu_per_call(decode, 2, min_seconds)
        rows.append([f"1/{scale}", f"{width // scale}x{height // scale}", f"{wall / len(payloads) * 1e3:.1f}",
                     f"{cpu / len(payloads) * 1e3:.1f}"])
    return rows


DCT_HEADERS = ["JPEG DCT scale (one thread)", "decoded size", "wall ms/image", "CPU ms/image"]


def cpu_seconds() -> tuple[float, float]:
    """(this process, its children and their descendants) CPU seconds so far: live children through psutil,
    plus what waited-for children used (os.times)."""
    import psutil

    times = os.times()
    own = times.user + times.system
    children = times.children_user + times.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            cpu = child.cpu_times()
            children += cpu.user + cpu.system
        except psutil.Error:
            continue
    return own, children


def cpu_per_call(step: Callable[[], object], min_iters: int, min_seconds: float) -> tuple[float, float]:
    """(median wall seconds, mean CPU seconds of this process) per call of `step`, after one warm-up call. CPU
    time does not grow when other jobs take the cores, so it is the figure to compare on a shared machine."""
    step()
    started = time.process_time()
    times = timed(step, min_iters, min_seconds, warmup=0)
    return float(np.median(times)), (time.process_time() - started) / len(times)


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
