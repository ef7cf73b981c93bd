"""Quality benchmark: the four protocols through the product's own `train` and `evaluate`, per recipe.

    python benchmarks/quality.py                              # every protocol x {anchor, legacy, new}
    python benchmarks/quality.py --protocols P1 P4 --recipes new
    python benchmarks/quality.py --recipes new --set trivial_augment=true --label new+trivial   # an ablation
    python benchmarks/quality.py --quick                      # seconds: tiny digits, random init, 32 px

Protocols (the data as a user would hand it over; the test images are never shown to `train`):
  P1  hymenoptera: all of train/ -> val/ (153 photos)
  P2  hymenoptera: 10 photos per class from train/ (seed 0) -> val/
  P3  digits: 20 per class (seed 0) -> all the others (1,597)
  P4  the digits demo (`transfer-serve demo` settings): the product's own split, its 270 held-out test images
Digits protocols use the demo's data settings (128 px serving size, no horizontal flip).

Recipes:
  anchor  logistic regression (StandardScaler + LogisticRegressionCV, C by CV on the training images) on frozen
          ImageNet embeddings, computed through the product's decoding and preprocessing at the serving size
  legacy  `train` with the pre-2026-11-27 defaults (`training.config.legacy_options`), then `evaluate`
  new     `train` with today's defaults, then `evaluate`
Accuracy and macro-F1 are those of `training.evaluate.evaluate_artifact` (what `transfer-serve evaluate` runs) on
the protocol's test images, with a 95% Wilson interval; wall time is `train`'s (data scan to exported artifact).
Hymenoptera protocols are skipped, saying why, when /work/shared/datasets/hymenoptera (or $HYMENOPTERA) is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402

HYMENOPTERA = Path(os.environ.get("HYMENOPTERA", "/work/shared/datasets/hymenoptera"))
PROTOCOLS = ("P1", "P2", "P3", "P4")
RECIPES = ("anchor", "legacy", "new")
QUICK_OPTIONS = dict(weights="none", image_size=32, steps=4, eval_every=2, batch_size=16, workers=0,
                     time_budget="none", threads=1, test_fraction=0.15)


def _load() -> str:
    return "%.1f/%.1f/%.1f" % os.getloadavg()


def _write_csv(records, path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for r in records:
            writer.writerow([str(r.path), r.label])
    return path


def _per_class(records, count: int, seed: int = 0):
    """`count` records per class, drawn with `seed` from the records sorted by path."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted({r.label for r in records}):
        pool = sorted((r for r in records if r.label == label), key=lambda r: str(r.path))
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False))]
    return chosen


def protocol_data(name: str, scratch: Path, quick: bool):
    """(training data path, test records or None for the product's own test split, train options) or a skip reason."""
    from cli import DEMO_OPTIONS
    from training.data import discover_images
    from training.demo_data import write_digits_folder

    if name in ("P1", "P2"):
        if not (HYMENOPTERA / "train").is_dir():
            return f"skipped: {HYMENOPTERA} is absent"
        train = discover_images(HYMENOPTERA / "train")
        test = discover_images(HYMENOPTERA / "val")
        if name == "P2":
            train = _per_class(train, 10)
        return _write_csv(train, scratch / f"{name}.csv"), test, {}
    digits = scratch / "digits"
    if not digits.exists():
        write_digits_folder(digits, classes=4 if quick else 10, per_class=15 if quick else None)
    options = {k: v for k, v in DEMO_OPTIONS.items() if k != "name"}
    if name == "P3":
        everything = discover_images(digits)
        train = _per_class(everything, 5 if quick else 20)
        chosen = {r.path for r in train}
        return _write_csv(train, scratch / "P3.csv"), [r for r in everything if r.path not in chosen], options
    return digits, None, options


def run_anchor(data: Path, test, options: dict, quick: bool, seed: int = 0) -> dict:
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from models.decoding import load_image
    from models.network import build_network
    from models.preprocessing import preprocess_batch
    from training.config import TrainConfig
    from training.data import discover_images, split_records
    from training.evaluate import evaluate_predictions

    config = TrainConfig(data=data, output=Path("unused"), **options)
    preprocessing = config.preprocessing()
    records = discover_images(data)
    if test is None:  # the product's split: fit on train+val, test on its test split
        splits = split_records(records, config.val_fraction, config.test_fraction, config.seed)
        records, test = splits.train + splits.val, splits.test
    labels = sorted({r.label for r in records})
    threads = torch.get_num_threads()
    if os.getloadavg()[0] >= (os.cpu_count() or 1):  # a busy shared CPU embeds faster on 1 thread (docs/TRAINING.md)
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = build_network(config.backbone, len(labels), weights=config.weights).eval()

    def embed(items) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(items), 32):
                images = [load_image(r.path, preprocessing=preprocessing) for r in items[start : start + 32]]
                out.append(model(torch.from_numpy(preprocess_batch(images, preprocessing)))[1].numpy())
        return np.concatenate(out)

    started = time.perf_counter()
    y_train = np.array([labels.index(r.label) for r in records])
    folds = int(min(5, np.bincount(y_train).min()))
    classifier = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=folds, max_iter=3000))
    classifier.fit(embed(records), y_train)
    probabilities = classifier.predict_proba(embed(test))
    wall = time.perf_counter() - started
    torch.set_num_threads(threads)
    report = evaluate_predictions(probabilities, [labels.index(r.label) for r in test], labels)
    return {"report": report, "wall_seconds": wall, "train_images": len(records),
            "detail": f"C={float(classifier[-1].C_[0]):.4g}"}


def run_product(data: Path, test, options: dict, scratch: Path, tag: str) -> dict:
    from models.predictor import Predictor
    from training.config import TrainConfig
    from training.data import discover_images
    from training.evaluate import evaluate_artifact
    from training.trainer import train

    config = TrainConfig(data=data, output=scratch / f"run-{tag}", **options)
    started = time.perf_counter()
    result = train(config, show_progress=False)
    wall = time.perf_counter() - started
    if test is None:  # the product's own held-out test split, through evaluate
        test = [r for r in discover_images(result.run_dir / "splits.csv") if r.split == "test"]
    report, _ = evaluate_artifact(Predictor.from_artifact(result.artifact), test)
    plan = result.plan
    detail = (f"steps {plan.steps} at {plan.train_image_size}px (budget {plan.budget_steps}), best step "
              f"{result.best_step}, refit {result.refit_steps}, threads {plan.threads}; own estimate "
              f"{result.test.source} {result.test.accuracy:.4f} on {result.test.images}")
    return {"report": report, "wall_seconds": wall, "train_images": plan.train_images + (plan.val_images if plan.refit else 0),
            "detail": detail}


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (legacy/new)")
    parser.add_argument("--label", default=None, help="name of the recipe in the table (with --set)")
    parser.add_argument("--quick", action="store_true", help="tiny digits, random init, 32 px: seconds")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per result")
    parser.add_argument("--scratch", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[list[object]]:
    from training.config import legacy_options

    args = parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k.replace("-", "_"): _value(v) for k, v in overrides.items()}
    protocols = [p for p in args.protocols if not (args.quick and p in ("P1", "P2"))] if args.quick else args.protocols
    print(f"# quality benchmark; {machine()}", flush=True)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        scratch = args.scratch or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        for protocol in protocols:
            prepared = protocol_data(protocol, scratch, args.quick)
            if isinstance(prepared, str):
                print(f"| {protocol} | - | {prepared} |", flush=True)
                rows.append([protocol, "-", prepared])
                continue
            data, test, options = prepared
            for recipe in args.recipes:
                load_before = _load()
                base = dict(options)
                if args.quick:
                    base |= QUICK_OPTIONS
                if recipe == "anchor":
                    outcome = run_anchor(data, test, base, args.quick)
                    name = recipe
                else:
                    recipe_options = (legacy_options(base.get("image_size")) | base if recipe == "legacy" else base)
                    if args.quick and recipe == "legacy":
                        recipe_options |= {"epochs": 1, "steps": None, "train_image_size": 32}
                    recipe_options |= overrides
                    name = args.label or recipe if overrides else recipe
                    tag = f"{protocol}-{name}-{time.time_ns()}"
                    outcome = run_product(data, test, recipe_options, scratch, tag)
                report = outcome["report"]
                low, high = report.accuracy_ci95
                row = [protocol, name, f"{report.accuracy:.4f}", f"{low:.3f}-{high:.3f}", f"{report.macro_f1:.4f}",
                       report.images, outcome["train_images"], f"{outcome['wall_seconds']:.0f}",
                       f"{load_before} -> {_load()}", outcome["detail"]]
                rows.append(row)
                print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps({"protocol": protocol, "recipe": name, "accuracy": report.accuracy,
                                                 "ci95": [low, high], "macro_f1": report.macro_f1,
                                                 "test_images": report.images, "train_images": outcome["train_images"],
                                                 "wall_seconds": outcome["wall_seconds"], "load": row[8],
                                                 "detail": outcome["detail"], "overrides": overrides,
                                                 "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print("# columns: protocol | recipe | accuracy | 95% CI | macro-F1 | test images | training images | "
          "wall s | load average before -> after | detail")
    return rows


if __name__ == "__main__":
    main()
