"""Training speed: images/s of a training epoch per mode, and time to reach the demo's target accuracy.

    python benchmarks/training_speed.py --quick            # seconds: 4 digit classes x 15 images at 32 px
    python benchmarks/training_speed.py                    # the demo: 10 classes x all 1,797 digits at 128 px
    python benchmarks/training_speed.py --device cuda      # adds bf16 autocast channels_last (what train() uses on GPU)

Part 1 (images/s per epoch): the same network (efficientnet_lite0, ImageNet weights) trained for `--steps`
optimizer steps on preprocessed digit batches, fp32 eager NCHW vs fp32 channels_last (vs bf16 autocast
channels_last on CUDA): forward, loss, backward, AdamW step; data loading excluded. Part 2 (time to target):
`training.trainer.train` on the demo's settings (the digits, image size 128, no flips; `--per-class` and
`--image-size` shrink it), wall seconds of the epochs until validation accuracy first reaches `--target`
(0.95 by default), images/s per epoch as train() records it (decoding and augmentation included).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402


def step_throughput(device: str, image_size: int, batch_size: int, steps: int, weights: str) -> list[list[object]]:
    from models.network import build_network

    modes = [("fp32 eager NCHW", torch.float32, False), ("fp32 channels_last", torch.float32, True)]
    if device == "cuda":
        modes.append(("bf16 autocast channels_last", torch.bfloat16, True))
    rows = []
    for name, dtype, channels_last in modes:
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = build_network("efficientnet_lite0", num_classes=10, weights=weights).to(device, memory_format=fmt).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
        targets = torch.randint(0, 10, (batch_size,), device=device)
        criterion = nn.CrossEntropyLoss()

        def step() -> None:
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                logits, _ = model(images)
                loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows.append([name, batch_size, image_size, steps, f"{steps * batch_size / seconds:.1f}"])
        print("| " + " | ".join(str(c) for c in rows[-1]) + " |", file=sys.stderr, flush=True)
    return rows


def time_to_target(args: argparse.Namespace, scratch: Path) -> tuple[list[list[object]], str]:
    from training.config import TrainConfig
    from training.demo_data import write_digits_folder
    from training.trainer import train

    data = scratch / "digits"
    write_digits_folder(data, classes=args.classes, per_class=args.per_class)
    config = TrainConfig(data=data, output=scratch / "run", weights=args.weights, image_size=args.image_size,
                         epochs=args.epochs, horizontal_flip=False, workers=args.workers, device=args.device,
                         batch_size=args.batch_size, export=False, name="digits", refit=False, min_val_images=1,
                         test_fraction=0.15, time_budget="none")
    started = time.perf_counter()
    result = train(config, show_progress=False)
    total = time.perf_counter() - started
    rows, elapsed, reached = [], 0.0, None
    for record in result.history:
        elapsed += record.seconds
        if reached is None and record.val_accuracy >= args.target:
            reached = elapsed
        rows.append([record.epoch + 1, f"{record.train_images_per_second:.1f}", f"{record.val_accuracy:.3f}",
                     f"{record.seconds:.1f}", f"{elapsed:.1f}"])
    summary = (f"target val accuracy {args.target}: " + (f"reached after {reached:.1f} s of epochs" if reached is not None
               else "not reached") + f"; train() wall {total:.1f} s; test accuracy {result.test.accuracy:.3f}")
    return rows, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=None, help="default: all digits (~180 per class)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 128, the demo's (32 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 8, the demo's (1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per mode in part 1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--skip-time-to-target", action="store_true")
    args = parser.parse_args(argv)
    args.classes = args.classes or (4 if args.quick else 10)
    args.per_class = args.per_class or (15 if args.quick else None)
    args.image_size = args.image_size or (32 if args.quick else 128)
    args.epochs = args.epochs or (1 if args.quick else 8)
    args.steps = args.steps or (2 if args.quick else 10)
    if args.quick:
        args.batch_size, args.workers = min(args.batch_size, 8), 0
    return args


def main(argv: list[str] | None = None) -> tuple[list[list[object]], list[list[object]]]:
    args = parse_args(argv)
    print(f"# training benchmark, {args.device}; {machine(args.device)}")
    steps = step_throughput(args.device, args.image_size, args.batch_size, args.steps, args.weights)
    print(table(["mode", "batch", "px", "steps", "train images/s"], steps), flush=True)
    epochs: list[list[object]] = []
    if not args.skip_time_to_target:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as scratch:
            epochs, summary = time_to_target(args, Path(scratch))
        print(f"# digits: {args.classes} classes, {args.per_class or 'all'} per class, {args.image_size} px, "
              f"batch {args.batch_size}, {args.workers} workers")
        print(table(["epoch", "train images/s", "val accuracy", "epoch s", "elapsed s"], epochs))
        print(f"# {summary}")
    return steps, epochs


if __name__ == "__main__":
    main()
