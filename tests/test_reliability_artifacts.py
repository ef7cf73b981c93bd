"""Safe artifacts: only hash-verified artifacts are served, checkpoints load with `weights_only=True`,
nothing a request carries is ever unpickled, and client-given URLs are not fetched unless enabled.
(The artifact checks themselves are in test_artifact.py, URL refusal over HTTP in test_service.py.)"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from typer.testing import CliRunner

from cli import app
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for package in ("models", "training", "service") for p in sorted((ROOT / package).rglob("*.py"))]
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "dill.load",
                "dill.loads", "marshal.loads", "shelve.open", "yaml.load", "yaml.unsafe_load"}  # fmt: skip


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_product_code_unpickles_or_loads_torch_files_unsafely():
    torch_loads = 0
    for path in PRODUCT:
        for node, name in calls(path):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert name not in UNSAFE_CALLS, f"{where}: {name}"
            if name == "torch.load":
                torch_loads += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"]
                assert safe and isinstance(safe[0].value, ast.Constant) and safe[0].value.value is True, where
            if name.endswith("np.load") or name.endswith("numpy.load"):
                assert not any(k.arg == "allow_pickle" for k in node.keywords), where
            if name.endswith("read_pickle"):
                raise AssertionError(f"{where}: {name}")
    assert torch_loads >= 3  # the run folder's checkpoints (training/run_dir.py) and the registry's weights are found and checked


def test_url_fetch_is_off_unless_the_operator_enables_it():
    assert ServiceSettings.from_env({}).upload_limits().allow_url_fetch is False
    enabled = ServiceSettings.from_env({"TRANSFER_SERVE_ALLOW_URL_FETCH": "true"})
    assert enabled.upload_limits().allow_url_fetch is True


def test_serve_refuses_a_tampered_artifact_before_starting(artifact_dir: Path, tmp_path: Path):
    tampered = tmp_path / "artifact"
    shutil.copytree(artifact_dir, tampered)
    model = next(p for p in tampered.iterdir() if p.suffix == ".onnx")
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
    result = CliRunner().invoke(app, ["serve", str(tampered), "--port", "9"])
    assert result.exit_code != 0
    assert "sha256" in result.output.lower() or "hash" in result.output.lower() or "modified" in result.output.lower(), result.output
