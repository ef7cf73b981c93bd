"""Raw inference speed of each runtime: images/s and latency per batch, side by side in one run.

    python benchmarks/runtime.py --quick                          # seconds: lite0 at 64 px, batch 1 and 4
    python benchmarks/runtime.py                                  # resnet50 + efficientnet_lite0, batch 1/32/256
    python benchmarks/runtime.py --batch-sizes 1 32 --compile     # add torch.compile (slow to compile on CPU)
    python benchmarks/runtime.py --device cuda --compile          # GPU: fp16/bf16 channels_last, max-autotune

Runtimes: eager fp32 (NCHW), eager channels_last fp32 / bf16 (/ fp16 on CUDA), the artifact's TorchScript
(frozen on CPU fp32; fp16 on CUDA), ONNX Runtime (CUDA provider when present), torch.compile of the
channels_last model (`--compile`; mode max-autotune on CUDA, default on CPU). Inputs are random N(0, 1)
batches: speed does not depend on pixel values. The eager/compiled rows take a tensor already on the device;
the TorchScript and ONNX rows take the numpy batch the service hands them (host->device copy included).
resnet50 has no offline ImageNet weights, so it runs with random weights (`weights=none`), which costs the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import export_model, machine, percentile, table, timed  # noqa: E402

CPU_RUNTIMES = ["eager-fp32", "eager-fp32-cl", "eager-bf16-cl", "torchscript", "onnx"]
CUDA_RUNTIMES = ["eager-fp32", "eager-fp32-cl", "eager-fp16-cl", "eager-bf16-cl", "torchscript", "torchscript-fp16", "onnx"]
WEIGHTS = {"efficientnet_lite0": "imagenet", "resnet50": "none"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def eager_step(model: torch.nn.Module, batch: np.ndarray, device: str, dtype: torch.dtype, channels_last: bool,
               compile_mode: str | None = None):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = model.to(device=device, dtype=dtype, memory_format=memory_format).eval()
    if compile_mode is not None:
        module = torch.compile(module, mode=compile_mode, dynamic=False)
    inputs = torch.from_numpy(batch).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    def step():
        with torch.inference_mode():
            return module(inputs)

    return step


def make_step(name: str, backbone: str, artifact: Path, batch: np.ndarray, device: str, threads: int):
    from models.artifact import load_artifact
    from models.network import build_network
    from models.runtimes import OnnxRuntime, TorchScriptRuntime

    if name == "onnx":
        runtime = OnnxRuntime(load_artifact(artifact), device, threads=threads)
        return lambda: runtime(batch), runtime.describe().get("providers", "")
    if name.startswith("torchscript"):
        precision = name.split("-")[1] if "-" in name else "fp32"
        runtime = TorchScriptRuntime(load_artifact(artifact), device, precision)
        return lambda: runtime(batch), "frozen" if device == "cpu" and precision == "fp32" else ""
    _, precision, *rest = name.split("-")
    torch.manual_seed(0)
    model = build_network(backbone, num_classes=10, weights="none")  # weights do not change the cost
    compile_mode = None
    if name.startswith("compile"):
        compile_mode = "max-autotune" if device == "cuda" else "default"
    return eager_step(model, batch, device, DTYPES[precision], bool(rest), compile_mode), compile_mode or ""


def measure(args: argparse.Namespace) -> list[list[object]]:
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runtimes = args.runtimes or (CUDA_RUNTIMES if device == "cuda" else CPU_RUNTIMES)
    if args.compile:
        runtimes = runtimes + ["compile-fp16-cl" if device == "cuda" else "compile-fp32-cl"]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as scratch:
        for backbone in args.backbones:
            artifact = export_model(Path(scratch) / backbone, backbone, WEIGHTS.get(backbone, "none"),
                                    image_size=args.image_size)
            size = args.image_size or 224
            for batch_size in args.batch_sizes:
                batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
                for name in runtimes:
                    try:
                        step, note = make_step(name, backbone, artifact, batch, device, args.threads)
                        times = timed(step, args.min_iters, args.min_seconds,
                                      warmup=max(3, args.warmup) if name.startswith(("compile", "torchscript")) else args.warmup, sync=sync)
                    except Exception as exc:  # a runtime that does not run here is reported, not fatal
                        rows.append([backbone, name, batch_size, "n/a", "", "", f"{type(exc).__name__}: {exc}"[:80]])
                        print(f"# {backbone} {name} b{batch_size}: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    mean = sum(times) / len(times)
                    rows.append([backbone, name, batch_size, f"{batch_size / mean:.1f}",
                                 f"{percentile(times, 50) * 1e3:.1f}", f"{percentile(times, 95) * 1e3:.1f}",
                                 f"{len(times)} iters {note}".strip()])
                    print("| " + " | ".join(str(c) for c in rows[-1]) + " |", file=sys.stderr, flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lite0 at 64 px, batch 1 and 4, 2 timed iterations.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbones", nargs="+", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--runtimes", nargs="+", default=None,
                        help=f"subset of {sorted(set(CPU_RUNTIMES + CUDA_RUNTIMES))} and compile-<fp32|fp16|bf16>-cl")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the channels_last model")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 (64 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--min-iters", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    args.backbones = args.backbones or (["efficientnet_lite0"] if args.quick else ["efficientnet_lite0", "resnet50"])
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 32, 256])
    args.image_size = args.image_size or (64 if args.quick else None)
    args.min_iters = args.min_iters or (2 if args.quick else 3)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else 5.0)
    return args


def main(argv: list[str] | None = None) -> list[list[object]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# runtime benchmark, {args.device}, {args.image_size or 224} px; {machine(args.device)}")
    rows = measure(args)
    print(table(["backbone", "runtime", "batch", "images/s", "p50 ms", "p95 ms", "note"], rows))
    return rows


if __name__ == "__main__":
    main()
