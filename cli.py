"""`transfer-serve`: the command line for every step of the product (train, evaluate, export, serve, extract)."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic.fields import FieldInfo

from models.inference import DEFAULT_TOP_K

# TorchScript is one of the artifact's two required forms; torch's deprecation notice for it is noise here.
warnings.filterwarnings("ignore", message="`torch.jit", category=FutureWarning)

app = typer.Typer(
    help="Fine-tune an ImageNet backbone on your images, export it, serve it and run it in batch jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_DEMO_DIR = Path("demo")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def friendly_errors(command: Callable) -> Callable:
    """Turn the product's own errors into one clear line and a non-zero exit instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from models.artifact import ArtifactError
        from models.decoding import ImageDecodeError
        from models.registry import UnknownBackboneError, WeightsError
        from models.inference import DeviceError, InferenceOptionsError
        from models.predictor import NonFiniteOutputError
        from models.runtimes import PrecisionError
        from training.data import DataError
        from training.export import ParityError
        from extraction.config import ExtractionError

        try:
            return command(*args, **kwargs)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            _fail(f"invalid option: {problems}")
        except (ArtifactError, DataError, DeviceError, ImageDecodeError, WeightsError, ParityError, FileExistsError,
                ExtractionError, InferenceOptionsError, PrecisionError, NonFiniteOutputError) as exc:
            _fail(str(exc))
        except UnknownBackboneError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; finished work is kept: continue with `train --resume`, or rerun the same `extract`", 130)

    return wrapper


@app.command("demo-data")
@friendly_errors
def demo_data(output: Path = typer.Argument(DEFAULT_DEMO_DIR / "digits", help="Folder to write the images into.")) -> None:
    """Write scikit-learn's digits as an image folder (one sub-folder per class): the embedded demo data."""
    from training.demo_data import write_digits_folder

    count = write_digits_folder(output)
    typer.echo(f"wrote {count} images to {output}")


def _cli_type(info: FieldInfo) -> type:
    """The type typer parses a field's flag as: text for choices (`Literal`) and for fields a validator parses from
    text (a duration); the field's own type otherwise. pydantic validates the value either way."""
    parsed_from_text = any(isinstance(m, BeforeValidator) for m in info.metadata)
    annotation = info.annotation
    union = get_origin(annotation) in (Union, types.UnionType)
    optional = union and type(None) in get_args(annotation)
    kinds = [a for a in get_args(annotation) if a is not type(None)] if union else [annotation]
    if len(kinds) > 1 or parsed_from_text:
        base: type = str
    elif get_origin(kinds[0]) is Literal:
        base = str
    else:
        base = kinds[0]
    return Optional[base] if optional or info.default is None else base  # type: ignore[return-value]


def config_options(model: type[BaseModel], skip: set[str]) -> list[inspect.Parameter]:
    """One keyword-only option per field of `model` (but `skip`): flag, default and help from the field, so every
    field has a flag and the two never disagree; a bool field gets `--name/--no-name`."""
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(info),
                          default=typer.Option(info.default, help=info.description))
        for name, info in model.model_fields.items()
        if name not in skip
    ]


def _train(data: Path, output: Optional[Path], legacy_defaults: bool, **options) -> None:
    """Fine-tune a backbone on labelled images, evaluate on the held-out test split, and export."""
    from training.config import TrainConfig
    from training.trainer import train as run_training

    if legacy_defaults:
        import click

        from training.config import legacy_options

        context = click.get_current_context()
        given = {k for k in options if context.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
        options |= {k: v for k, v in legacy_options(options["image_size"], options["backbone"]).items() if k not in given}
    config = TrainConfig(**(options | {"data": data, "output": output or Path("runs") / data.stem}))
    _report_training(run_training(config))


def _train_signature() -> inspect.Signature:
    from training.config import TrainConfig

    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature([
        inspect.Parameter("data", keyword, annotation=Path, default=typer.Option(
            ..., "--data", help="Image folder (one sub-folder per class) or CSV manifest.")),
        inspect.Parameter("output", keyword, annotation=Optional[Path], default=typer.Option(
            None, help="Run directory (default: runs/<data name>).")),
        *config_options(TrainConfig, skip={"data", "output"}),
        inspect.Parameter("legacy_defaults", keyword, annotation=bool, default=typer.Option(
            False, "--legacy-defaults", help="Start from the pre-2026-11-27 defaults (8 epochs, 70/15/15, no refit, "
            "training at the serving size, ...); options given explicitly still win.")),
    ])  # fmt: skip


_train.__signature__ = _train_signature()  # type: ignore[attr-defined]
_train.__annotations__ = {p.name: p.annotation for p in _train.__signature__.parameters.values()}
train = app.command("train")(friendly_errors(_train))


def _report_training(result) -> None:
    from training.run_dir import RunDir

    test = result.test
    if result.skipped:
        typer.echo(f"skipped {len(result.skipped)} unreadable images (listed in {RunDir(result.run_dir).skipped})")
    if result.selection is not None:
        typer.echo(result.selection.describe())
    if test.source == "none":
        typer.echo(f"no held-out estimate: {test.note}")
        typer.echo(f"run directory: {result.run_dir}")
        if result.artifact:
            from models.artifact import manifest_digest

            typer.echo(f"artifact: {result.artifact}  (digest {manifest_digest(result.artifact)})")
        return
    low, high = test.accuracy_ci95 or (0.0, 1.0)
    if result.selection is not None and result.selection.chosen == "probe":
        chosen = "the probe (a linear head on the frozen backbone)" + (", refit on train+val" if result.plan.select else "")
    else:
        chosen = f"best validation at step {result.best_step}" + (
            f", refit on train+val for {result.refit_steps} steps" if result.refit_steps else "")
    what = "held-out test images" if test.source == "test" else "validation images; NO test split, optimistic"
    typer.echo(
        f"{'test' if test.source == 'test' else 'validation'} accuracy {test.accuracy:.4f} "
        f"(95% CI {low:.4f}-{high:.4f})  macro-F1 {test.macro_f1:.4f}  ECE {test.expected_calibration_error:.4f}"
        f"  ({test.images} {what}; {chosen})"
    )
    if test.source != "test" and test.note:
        typer.echo(f"note: {test.note}")
    typer.echo(f"run directory: {result.run_dir}")
    if result.artifact:
        from models.artifact import manifest_digest

        typer.echo(f"artifact: {result.artifact}  (digest {manifest_digest(result.artifact)})")


@app.command()
@friendly_errors
def demo(
    workdir: Path = typer.Option(DEFAULT_DEMO_DIR, help="Where the demo data and run go."),
    weights: str = typer.Option("imagenet", help="'imagenet' or 'none' (to compare with random init)."),
) -> None:
    """The embedded default end to end: digits -> fine-tune efficientnet_lite0 -> test metrics -> artifact."""
    from training.config import TrainConfig
    from training.demo_data import write_digits_folder
    from training.run_dir import RunDir
    from training.trainer import train as run_training

    data = workdir / "digits"
    if not data.exists():
        typer.echo(f"wrote {write_digits_folder(data)} demo images to {data}")
    run_dir = workdir / ("run" if weights == "imagenet" else f"run-{Path(weights).stem}")
    config = TrainConfig(data=data, output=run_dir, weights=weights, resume=RunDir(run_dir).holds_run(), **DEMO_OPTIONS)
    _report_training(run_training(config))


DEMO_OPTIONS = dict(image_size=128, horizontal_flip=False, name="digits")
"""What the demo sets beyond the defaults: 8x8 digits need no 224 px input, and mirrored digits are other digits."""


@app.command()
@friendly_errors
def evaluate(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    data: Path = typer.Option(..., "--data", help="Labelled image folder, CSV manifest, or a run's splits.csv."),
    split: Optional[str] = typer.Option(None, help="Only this split of the data (train, val or test)."),
    output: Path = typer.Option(Path("evaluation"), help="Folder for report.json, evaluation.html and confusion_matrix.png."),
    runtime: str = typer.Option("auto", help="auto | onnx | torchscript."),
    ood: Optional[Path] = typer.Option(
        None, "--ood", help="Folder of out-of-distribution images (any images, recursive): adds AUROC, FPR@95%TPR "
        "and the share flagged to report.json, and ood_histogram.png."
    ),
) -> None:
    """Score an artifact on labelled images: accuracy, macro-F1, per-class precision/recall, confusion, ECE, and
    the out-of-distribution detector (share flagged; with --ood, separation from foreign images)."""
    from models.inference import InferenceOptions
    from models.predictor import Predictor
    from training.data import DataError, discover_images
    from models.image_files import list_image_files
    from training.evaluate import evaluate_artifact, save_confusion_matrix_png

    records = discover_images(data)
    if split:
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"{data} has no images in split {split!r}")
    ood_images = None
    if ood is not None:
        ood_images = list_image_files(ood) if ood.is_dir() else []
        if not ood_images:
            raise DataError(f"--ood {ood}: no image files found (expected a folder of images, searched recursively)")
    output.mkdir(parents=True, exist_ok=True)
    report, skipped = evaluate_artifact(
        Predictor.from_artifact(artifact, InferenceOptions(runtime=runtime)), records, ood_images=ood_images,
        ood_histogram_png=output / "ood_histogram.png" if ood_images else None, html_report=output / "evaluation.html",
    )
    (output / "report.json").write_text(report.model_dump_json(indent=2))
    save_confusion_matrix_png(report, output / "confusion_matrix.png")
    for item in skipped:
        typer.echo(f"skipped unreadable image {item.path}: {item.reason}", err=True)
    summary = report.headline() | {"images": report.images}
    if report.ood_flagged_share is not None:
        summary["ood_flagged_share"] = report.ood_flagged_share
    if report.ood is not None:
        summary |= {f"ood_{k}": v for k, v in report.ood.model_dump().items()}
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"report: {output / 'report.json'}  (to read: {output / 'evaluation.html'})")


@app.command()
@friendly_errors
def export(
    run_dir: Path = typer.Argument(..., help="A training run directory (holding best.pt)."),
    output: Optional[Path] = typer.Option(None, help="Artifact directory (default: RUN_DIR/artifact)."),
) -> None:
    """Export a run's best weights as an artifact (TorchScript + ONNX + manifest), checking parity."""
    from models.artifact import manifest_digest
    from training.export import export_run

    artifact = export_run(run_dir, output)
    typer.echo(f"artifact: {artifact}\ndigest: {manifest_digest(artifact)}")


@app.command()
def backbones() -> None:
    """List the registered backbones with their pretrained configuration."""
    from models.registry import get_spec, list_backbones

    for name in list_backbones():
        spec = get_spec(name)
        p = spec.preprocessing
        geometry = "squash" if p.resize == "squash" else f"crop {p.crop_pct:.3g}"
        typer.echo(f"{name:20s} {p.image_size}px {geometry} {p.interpolation}  embedding {spec.embedding_dim:4d}  "
                   f"weights: {spec.weights_source}")
    typer.echo("timm/<name>          any timm model (e.g. timm/convnext_tiny.fb_in22k): its pretrained config's "
               "preprocessing, weights from the Hugging Face cache or --weights FILE")


@app.command()
@friendly_errors
def audit(
    data: Path = typer.Argument(..., help="Image folder or CSV manifest (the same inputs as `train`)."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Embed with this trained artifact's network "
                                            "(default: the default backbone's ImageNet weights)."),
    output: Optional[Path] = typer.Option(None, help="Folder for audit.json and audit.html (default: audits/<data name>)."),
    image_size: Optional[int] = typer.Option(None, help="Input side without --artifact (default: the backbone's)."),
    engine: str = typer.Option("local", help="local | ray: extraction's engine computes the embeddings."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Find unreadable files, exact and near duplicates (across splits and labels), likely label errors, class
    imbalance and outliers; writes audit.json and audit.html and prints a one-line summary."""
    from extraction.embed import embed_paths
    from training.audit.run import AUDIT_HTML, AuditConfig, run_audit

    config = AuditConfig(data=data, output=output or Path("audits") / data.stem, artifact=artifact,
                         image_size=image_size, engine=engine, show_progress=progress)
    report = run_audit(config, embed_paths)
    typer.echo(report.summary)
    typer.echo(f"report: {config.output / AUDIT_HTML}")


# --- serving commands (import, serve) ---


@app.command("import")
@friendly_errors
def import_artifact(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    name: Optional[str] = typer.Option(None, help="Model-store name (default: the manifest's model name)."),
) -> None:
    """Put an artifact into BentoML's model store, to serve by tag and to pack into a Bento."""
    from service.model_store import import_artifact as store

    model = store(artifact, name)
    typer.echo(f"model-store tag: {model.tag}  ({model.path})")
    typer.echo(f"serve it: TRANSFER_SERVE_MODEL={model.tag} bentoml serve service.service:TransferServe")
    typer.echo(f"build a Bento: TRANSFER_SERVE_MODEL={model.tag} bentoml build")


@app.command()
@friendly_errors
def serve(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(3000),
    runtime: Optional[str] = typer.Option(None, help="auto | onnx | torchscript (default: fastest on the device)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    precision: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16 (torchscript only)."),
    max_batch_size: Optional[int] = typer.Option(None, help="Most images per forward pass (default 32)."),
    max_latency_ms: Optional[int] = typer.Option(None, help="Longest wait for a batch before a 503 (default 10000)."),
    expect_digest: Optional[str] = typer.Option(
        None, help="Refuse to serve unless the artifact's digest is this 'sha256:…' (printed at export, in /metadata)."
    ),
) -> None:
    """Serve a local artifact over HTTP: /classify, /embed, /metadata, /livez, /readyz, /metrics, docs at /.

    Other settings come from TRANSFER_SERVE_* variables (see docs/SERVING.md). The artifact is loaded here first,
    exactly as each worker will load it, so one the workers would refuse ends this command with one line."""
    import os

    from service.launch import server_command, server_env
    from service.loading import load_predictor, open_artifact
    from service.settings import ServiceSettings

    options = dict(runtime=runtime, device=device, precision=precision, max_batch_size=max_batch_size,
                   max_latency_ms=max_latency_ms, expect_digest=expect_digest)  # fmt: skip
    settings = ServiceSettings.from_env(
        overrides={"artifact": artifact.resolve(), "model": None} | {k: v for k, v in options.items() if v is not None}
    )
    predictor = load_predictor(settings, open_artifact(settings, None))  # refuse here what a worker would refuse
    resolved = settings.model_copy(update=predictor.inference.model_dump())  # the workers run what was resolved here
    del predictor
    command = server_command(host, port)
    os.execve(command[0], command, server_env(resolved, os.environ))


# --- extraction commands (extract) ---


@app.command()
@friendly_errors
def extract(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    input: Path = typer.Option(..., "--input", help="Image folder (recursive), or a .csv / .parquet manifest with a 'path' column."),
    output: Path = typer.Option(..., "--output", help="Output folder: Parquet shards, _errors.jsonl, _summary.json."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    shard_size: int = typer.Option(4096, help="Images per Parquet shard (the unit of resume)."),
    workers: int = typer.Option(2, help="Local engine: image-decoding worker processes (0: in-process)."),
    top_k: int = typer.Option(DEFAULT_TOP_K, help="Labels kept per image."),
    embedding_dtype: str = typer.Option("float32", help="float32 | float16."),
    runtime: str = typer.Option("auto", help="auto | onnx | torchscript (auto: onnx on CPU, torchscript on GPU)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (reduced precision: torchscript only)."),
    engine: str = typer.Option("local", help="local | ray (Ray Data; joins RAY_ADDRESS or starts a local Ray)."),
    ray_concurrency: int = typer.Option(1, help="Ray: inference actors."),
    ray_gpus_per_actor: float = typer.Option(0.0, help="Ray: GPUs per inference actor."),
    ray_num_cpus: Optional[int] = typer.Option(None, help="Ray: CPUs of the local Ray the job starts."),
    ray_decode_cpus: float = typer.Option(1.0, help="Ray: CPUs per decoding task."),
    progress: bool = typer.Option(True, help="Show a progress bar (images/s, ETA)."),
) -> None:
    """Embed and classify every image into resumable Parquet shards (same runtime and preprocessing as the service)."""
    from extraction.config import ExtractionConfig, RayOptions
    from extraction.job import run_extraction

    config = ExtractionConfig(
        artifact=artifact, input=input, output=output, batch_size=batch_size, shard_size=shard_size, workers=workers,
        top_k=top_k, embedding_dtype=embedding_dtype, runtime=runtime, device=device, precision=precision,
        engine=engine, show_progress=progress,
        ray=RayOptions(
            concurrency=ray_concurrency, num_gpus=ray_gpus_per_actor, decode_cpus=ray_decode_cpus,
            local_num_cpus=ray_num_cpus,
        ),
    )
    try:
        summary = run_extraction(config)
    except KeyboardInterrupt:
        _fail(f"interrupted; finished shards in {output} are kept (run the same command again to resume)", 130)
    typer.echo(summary.model_dump_json(indent=2))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
