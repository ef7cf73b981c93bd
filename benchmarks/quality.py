"""Quality benchmark: the six protocols through the product's own `train` and `evaluate`, per recipe, 3 samplings.

    python benchmarks/quality.py                              # every protocol x {probe, legacy, new} x seeds 0-2
    python benchmarks/quality.py --protocols P1 P4 --recipes probe new
    python benchmarks/quality.py --probe-only                 # the frozen-feature probe alone (minutes, cached)
    python benchmarks/quality.py --probe-only --resize native squash --backbone efficientnet_lite1
    python benchmarks/quality.py --recipes new --set trivial_augment=true --label new+trivial   # an ablation
    python benchmarks/quality.py --quick                      # seconds: tiny digits, random init, 32 px

Protocols (the data as a user would hand it over; the test images are never shown to `train`):
  P1  hymenoptera: all of train/ -> val/ (153 photos)
  P2  hymenoptera: 10 photos per class from train/ -> val/
  P3  digits: 20 per class -> all the others (1,597)
  P4  the digits demo (`transfer-serve demo` settings): the product's own split, its 270 held-out test images
  P5  monkeys: 10 photos per class from train/ -> all of val/ (272)
  P6  monkeys: all of train/ (1,097) -> val/
Every protocol runs with each of `--seeds` (default 0 1 2): the seed draws the k-per-class sample (P2, P3, P5;
numpy default_rng(seed) over the paths sorted per class, classes sorted) and, for the product, seeds the split and
training; rows give the mean ± sd (sample sd) and each seed's accuracy. Digits protocols use the demo's data
settings (128 px serving size, no horizontal flip).

Recipes:
  probe   logistic regression on frozen, L2-normalised embeddings, C from 0.1-10 by 5-fold CV on the training
          images (benchmarks/probe.py), embedded through the product's decoding, preprocessing (at the serving
          size) and backbone; `--resize squash` adds the old lite0 squash (bilinear) beside the backbone's own
  legacy  `train` with the pre-2026-11-27 defaults (`training.config.legacy_options`), then `evaluate`
  new     `train` with today's defaults, then `evaluate`
`--backbone` sets the backbone of every recipe, so the probe printed beside the product is the same backbone's.
Accuracy and macro-F1 are those of `training.evaluate.evaluate_artifact` (what `transfer-serve evaluate` runs) on
the protocol's test images (the probe: `evaluate_predictions` on its probabilities); wall time is `train`'s (data
scan to exported artifact) or the probe's embedding (not cached) + fit.
Photo protocols are skipped, saying why, when /work/shared/datasets/{hymenoptera,monkeys} (or $HYMENOPTERA,
$MONKEYS) are absent.
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

from models.registry import DEFAULT_BACKBONE  # noqa: E402

DATASETS = Path(os.environ.get("DATASETS", "/work/shared/datasets"))
HYMENOPTERA = Path(os.environ.get("HYMENOPTERA", DATASETS / "hymenoptera"))
MONKEYS = Path(os.environ.get("MONKEYS", DATASETS / "monkeys"))
PROTOCOLS = ("P1", "P2", "P3", "P4", "P5", "P6")
RECIPES = ("probe", "legacy", "new")
SEEDS = (0, 1, 2)
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


ONE_PROBE_FIT = ("P1", "P6")
"""All of train/ -> val/: the samplings do not change the probe's data (its fit is deterministic): one fit."""
PHOTO_PROTOCOLS = {"P1": (HYMENOPTERA, None), "P2": (HYMENOPTERA, 10), "P5": (MONKEYS, 10), "P6": (MONKEYS, None)}
"""Photo protocols: (dataset with train/ and val/, photos per class sampled from train/ or None for all)."""


def protocol_data(name: str, scratch: Path, quick: bool, seed: int = 0):
    """(training data path, test records or None for the product's own test split, train options) or a skip reason.

    `seed` draws the k-per-class sample (P2, P3, P5) and, for the product, seeds the split and training."""
    from cli import DEMO_OPTIONS
    from training.data import discover_images
    from training.demo_data import write_digits_folder

    if name in PHOTO_PROTOCOLS:
        root, per_class = PHOTO_PROTOCOLS[name]
        if not (root / "train").is_dir():
            return f"skipped: {root} is absent"
        train = discover_images(root / "train")
        test = discover_images(root / "val")
        if per_class is not None:
            train = _per_class(train, per_class, seed)
        return _write_csv(train, scratch / f"{name}-{seed}.csv"), test, {"seed": seed}
    digits = scratch / ("digits-quick" if quick else "digits")
    if not digits.exists():
        write_digits_folder(digits, classes=4 if quick else 10, per_class=15 if quick else None)
    options = {k: v for k, v in DEMO_OPTIONS.items() if k != "name"} | {"seed": seed}
    if name == "P3":
        everything = discover_images(digits)
        train = _per_class(everything, 5 if quick else 20, seed)
        chosen = {r.path for r in train}
        return _write_csv(train, scratch / f"P3-{seed}.csv"), [r for r in everything if r.path not in chosen], options
    return digits, None, options


def probe_preprocessing(config, resize: str):
    """The run's serving preprocessing, or ('squash') the stretch to a square with bilinear interpolation that
    efficientnet_lite0 artifacts used before 2026-12-04."""
    preprocessing = config.preprocessing()
    if resize == "squash":
        return preprocessing.model_copy(update={"resize": "squash", "crop_pct": 1.0, "interpolation": "bilinear"})
    return preprocessing


def run_probe(data: Path, test, options: dict, scratch: Path, resize: str = "native") -> dict:
    """The frozen-feature probe (benchmarks/probe.py) on the protocol's training images, tested on its test images.

    Each image is embedded once per (backbone, preprocessing) (cached under `scratch`), so samplings reuse them."""
    from probe import embed_paths, probe_accuracy

    from training.config import TrainConfig
    from training.data import discover_images, split_records

    config = TrainConfig(data=data, output=Path("unused"), **options)
    preprocessing = probe_preprocessing(config, resize)
    records = discover_images(data)
    if test is None:  # the product's split: fit on train+val, test on its test split
        splits = split_records(records, config.val_fraction, config.test_fraction, config.seed)
        records, test = splits.train + splits.val, splits.test
    labels = sorted({r.label for r in records})
    started = time.perf_counter()
    paths = sorted({str(r.path) for r in list(records) + list(test)})
    embeddings = embed_paths(paths, config.backbone, preprocessing, scratch / "embeddings", weights=config.weights)
    accuracy, c, report = probe_accuracy(embeddings, [(str(r.path), r.label) for r in records],
                                         [(str(r.path), r.label) for r in test], labels)
    wall = time.perf_counter() - started
    return {"report": report, "wall_seconds": wall, "train_images": len(records),
            "detail": f"{config.backbone} {preprocessing.resize} {preprocessing.image_size}px {preprocessing.interpolation}; "
                      f"C={c:.3g}; embedding {embeddings.cpu_seconds_per_image * 1000:.0f} CPU-ms/image, "
                      f"{embeddings.wall_seconds_per_image * 1000:.0f} wall-ms/image on {embeddings.threads} thread(s)"
                      + (f"; {len(embeddings.undecodable)} undecodable left out" if embeddings.undecodable else "")}


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
              f"{result.test.source} {result.test.accuracy:.4f} on {result.test.images}"
              + (f"; {result.selection.describe()}" if result.selection is not None else "; fine-tune only"))
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
    parser.add_argument("--probe-only", action="store_true", help="only the frozen-feature probe: minutes, not hours")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="samplings (and training seeds)")
    parser.add_argument("--backbone", default=None, help="backbone of every recipe (default: the product's)")
    parser.add_argument("--resize", nargs="+", choices=("native", "squash"), default=["native"],
                        help="probe preprocessing: the backbone's own (native) and/or the old lite0 squash")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (legacy/new)")
    parser.add_argument("--label", default=None, help="name of the recipe in the table (with --set)")
    parser.add_argument("--quick", action="store_true", help="tiny digits, random init, 32 px: seconds")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per result")
    parser.add_argument("--scratch", type=Path, default=None, help="work folder (keeps the probe's embeddings)")
    return parser.parse_args(argv)


def _mean_sd(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{100 * np.mean(values):.2f} ± {100 * sd:.2f}%"


def _run_one(protocol: str, recipe: str, resize: str, seed: int, args, overrides: dict, scratch: Path):
    """One (protocol, recipe, sampling): (recipe name, outcome) or a skip reason."""
    from training.config import legacy_options

    prepared = protocol_data(protocol, scratch, args.quick, seed)
    if isinstance(prepared, str):
        return prepared
    data, test, options = prepared
    base = dict(options) | ({"backbone": args.backbone} if args.backbone else {})
    if args.quick:
        base |= QUICK_OPTIONS
    if recipe == "probe":
        name = "probe" if resize == "native" else f"probe-{resize}"
        return name, run_probe(data, test, base, scratch, resize)
    recipe_options = legacy_options(base.get("image_size"), base.get("backbone", DEFAULT_BACKBONE)) | base \
        if recipe == "legacy" else base
    if args.quick and recipe == "legacy":
        recipe_options |= {"epochs": 1, "steps": None, "train_image_size": 32}
    recipe_options |= overrides
    name = args.label or recipe if overrides else recipe
    tag = f"{protocol}-{name}-{seed}-{time.time_ns()}"
    return name, run_product(data, test, recipe_options, scratch, tag)


def main(argv: list[str] | None = None) -> list[list[object]]:
    args = parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k.replace("-", "_"): _value(v) for k, v in overrides.items()}
    recipes = ["probe"] if args.probe_only else args.recipes
    protocols = [p for p in args.protocols if not (args.quick and p in PHOTO_PROTOCOLS)]
    print(f"# quality benchmark; {machine()}", flush=True)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        scratch = args.scratch or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        for protocol in protocols:
            for recipe in recipes:
                for resize in args.resize if recipe == "probe" else ["native"]:
                    load_before = _load()
                    outcomes, name, skip = [], recipe, None
                    seeds = args.seeds[:1] if recipe == "probe" and protocol in ONE_PROBE_FIT else args.seeds
                    for seed in seeds:
                        result = _run_one(protocol, recipe, resize, seed, args, overrides, scratch)
                        if isinstance(result, str):
                            skip = result
                            break
                        name, outcome = result
                        outcomes.append(outcome)
                        _record(args.out, protocol, name, seed, outcome, overrides)
                    if skip:
                        print(f"| {protocol} | {recipe} | {skip} |", flush=True)
                        rows.append([protocol, recipe, skip])
                        continue
                    reports = [o["report"] for o in outcomes]
                    row = [protocol, name, _mean_sd([r.accuracy for r in reports]),
                           " ".join(f"{r.accuracy:.4f}" for r in reports),
                           f"{np.mean([r.macro_f1 for r in reports]):.4f}", reports[0].images,
                           outcomes[0]["train_images"], f"{np.mean([o['wall_seconds'] for o in outcomes]):.0f}",
                           f"{load_before} -> {_load()}", outcomes[0]["detail"]]
                    rows.append(row)
                    print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
    print(f"# columns: protocol | recipe | accuracy mean ± sd over seeds {' '.join(map(str, args.seeds))} (the probe "
          f"on {'/'.join(ONE_PROBE_FIT)}: one fit) | "
          "accuracy per seed | mean macro-F1 | test images | training images (first seed) | mean wall s | "
          "load average before -> after | detail (first seed)")
    return rows


def _record(out: Path | None, protocol: str, name: str, seed: int, outcome: dict, overrides: dict) -> None:
    if out is None:
        return
    report = outcome["report"]
    with open(out, "a") as handle:
        handle.write(json.dumps({"protocol": protocol, "recipe": name, "seed": seed, "accuracy": report.accuracy,
                                 "ci95": list(report.accuracy_ci95), "macro_f1": report.macro_f1,
                                 "test_images": report.images, "train_images": outcome["train_images"],
                                 "wall_seconds": outcome["wall_seconds"], "load": _load(),
                                 "detail": outcome["detail"], "overrides": overrides,
                                 "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")


if __name__ == "__main__":
    main()
