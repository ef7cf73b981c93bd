"""A built Bento starts and serves on its own: its `src/` holds everything the service imports (checked
statically, then by serving it from a Python environment where this project is not importable), every
third-party package it imports is in the packages the Bento installs, and `bentoml serve <bento tag>` works
on the build machine with the settings baked in at build time. No Docker here: the generated Dockerfile is
checked, not built (docs/SERVING.md)."""

from __future__ import annotations

import ast
import os
import re
import site
import subprocess
import sys
import time
from importlib.metadata import packages_distributions
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from models.artifact import load_artifact
from service.launch import free_port, stop_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ENTRY = "service/service.py"
SERVICE_PACKAGES = {"service", "models"}  # what the service may import from this project


# --- building ----------------------------------------------------------------------------------------------------


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFER_SERVE_") and k != "PYTHONPATH"}
    return env | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def bento(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `bentoml build` (isolated BENTOML_HOME) of the tiny artifact, imported into that home's model store."""
    home = tmp_path_factory.mktemp("bento_home")
    env = clean_env(home) | {"PYTHONPATH": str(ROOT)}
    imported = subprocess.run([sys.executable, "-m", "cli", "import", str(artifact_dir)], env=env,
                              capture_output=True, text=True, cwd=ROOT)
    assert imported.returncode == 0, imported.stderr
    model_tag = re.search(r"model-store tag: (\S+)", imported.stdout).group(1)
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT), "--output", "tag"],
                           env=env | {"TRANSFER_SERVE_MODEL": model_tag}, capture_output=True, text=True, cwd=ROOT)
    assert built.returncode == 0, built.stdout + built.stderr
    bento_tag = re.search(r"__tag__:(\S+)", built.stdout).group(1)
    name, version = bento_tag.split(":")
    return dict(home=home, model_tag=model_tag, tag=bento_tag, path=home / "bentos" / name / version)


# --- what the Bento's code imports -------------------------------------------------------------------------------


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, imports anywhere) of a file, as dotted names (absolute imports only)."""
    module_level: set[str] = set()
    anywhere: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module != "__future__":
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            anywhere.update(names)
            if not nested:
                module_level.update(names)
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), nested=False)
    return module_level, anywhere


def module_file(src: Path, dotted: str) -> Path | None:
    base = src.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def local_package(src: Path, dotted: str) -> bool:
    return (src / dotted.split(".")[0]).is_dir() or dotted.split(".")[0] in {"training", "extraction", "service",
                                                                             "models", "cli"}


def service_closure(src: Path) -> tuple[set[Path], set[str]]:
    """The project files `service/service.py` imports, transitively (lazy imports included), and any project
    module it names that is not in `src` (a missing file)."""
    seen: set[Path] = set()
    missing: set[str] = set()
    todo = [src / SERVICE_ENTRY]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dotted in imports_of(path)[1]:
            if not local_package(src, dotted):
                continue
            found = module_file(src, dotted)
            if found is not None:
                todo.append(found)
            elif module_file(src, dotted.rpartition(".")[0]) is None:  # `from pkg.mod import name`: mod is enough
                missing.add(dotted)
    return seen, missing


def third_party(src: Path, dotted_names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in dotted_names
            if name.split(".")[0] not in sys.stdlib_module_names and not local_package(src, name)}


def declared_distributions(bento_path: Path) -> set[str]:
    """What the Bento's install step installs: env/python/requirements.txt (bentofile packages + bentoml)."""
    lines = (bento_path / "env" / "python" / "requirements.txt").read_text().splitlines()
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip() and not line.startswith("#")}


def test_the_bento_src_holds_the_service_import_closure_and_declares_its_packages(bento):
    src = bento["path"] / "src"
    closure, missing = service_closure(src)
    assert not missing, f"the service imports project modules the Bento does not hold: {sorted(missing)}"
    packages = {path.relative_to(src).parts[0] for path in closure}
    assert packages <= SERVICE_PACKAGES, packages
    assert src / "service" / "bentoml_compat.py" in closure  # the kind of file a hand-kept list once left out
    assert not (src / "training").exists() and not (src / "extraction").exists()

    declared = declared_distributions(bento["path"])
    distributions = packages_distributions()
    needed: dict[str, set[str]] = {}  # import name -> files needing it
    optional: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        module_level, anywhere = imports_of(path)
        # module-level imports run when any code imports the file; lazy ones only matter where the service runs
        for name in third_party(src, module_level | (anywhere if path in closure else set())):
            needed.setdefault(name, set()).add(str(path.relative_to(src)))
        for name in third_party(src, anywhere - module_level) if path not in closure else ():
            optional.setdefault(name, set()).add(str(path.relative_to(src)))

    def is_declared(name: str) -> bool:
        return bool({canonicalize_name(d) for d in distributions.get(name, [])} & declared)

    undeclared = {name: sorted(files) for name, files in needed.items() if not is_declared(name)}
    assert not undeclared, f"imported by the Bento's code but not in its python packages ({sorted(declared)}): {undeclared}"
    # lazy imports in code the service never runs (building networks for training) need not be installed
    print("not in the Bento, imported lazily outside the service:",
          {name: sorted(files) for name, files in optional.items() if not is_declared(name)})


def test_the_generated_dockerfile_installs_the_declared_packages(bento):
    bento_path = bento["path"]
    dockerfile = (bento_path / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.8\.\d+-cudnn-runtime", dockerfile, flags=re.M)
    assert "RUN bash -euxo pipefail /home/bentoml/bento/env/python/install.sh" in dockerfile
    assert "ENV TRANSFER_SERVE_MODEL=$TRANSFER_SERVE_MODEL" in dockerfile  # the baked setting
    install = (bento_path / "env" / "python" / "install.sh").read_text()
    assert 'REQUIREMENTS_TXT="$BASEDIR/requirements.txt"' in install and '-r "$REQUIREMENTS_TXT"' in install
    import yaml

    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    requirements = (bento_path / "env" / "python" / "requirements.txt").read_text().splitlines()
    for package in bentofile["python"]["packages"]:
        assert package in requirements
    assert any(line.startswith("bentoml==") for line in requirements)


@pytest.mark.skipif(not os.environ.get("TRANSFER_SERVE_TEST_PIP_RESOLVE"), reason="needs the package index: "
                    "set TRANSFER_SERVE_TEST_PIP_RESOLVE=1")
def test_the_bento_requirements_resolve_against_the_constraints(bento, tmp_path):
    """pip resolves the Bento's install set (ignoring what is installed here) without downloading wheels."""
    report = tmp_path / "report.json"
    resolved = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         "-r", str(bento["path"] / "env" / "python" / "requirements.txt"), "-c", str(ROOT / "constraints.txt")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    import json

    versions = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert versions["torch"] == "2.14.1" and versions["torchvision"] == "0.29.1" and versions["bentoml"] == "1.4.40"


# --- serving it --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def isolated_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv without this project: system site-packages added by a .pth file, whose own .pth files (among them
    the editable install's finder) are therefore not processed; so third-party packages import, `service` not."""
    folder = tmp_path_factory.mktemp("isolated")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "env")], check=True)
    python = folder / "env" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "system_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for module, importable in [("service", False), ("models", False), ("training", False), ("bentoml", True)]:
        probe = subprocess.run([str(python), "-c", f"import {module}"], cwd=folder, env=env, capture_output=True)
        assert (probe.returncode == 0) == importable, (module, probe.stderr.decode()[-500:])
    return python


def test_bentoml_serve_bento_tag_classifies_without_the_project_installed(bento, isolated_python, digits_dir,
                                                                          artifact_dir, tmp_path):
    """`bentoml serve transfer-serve:<version>` as README says: no TRANSFER_SERVE_* variable set, the service
    imported from the Bento's src/ only, the model tag from the settings baked into the Bento."""
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(bento["home"])
    command = [str(isolated_python), "-m", "bentoml", "serve", bento["tag"], "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            assert "Application startup failed" not in log.read_text(), log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready after 150 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        image = sorted((digits_dir / "2").glob("*.png"))[0]
        response = httpx.post(f"{url}/classify", files=[("images", (image.name, image.read_bytes(), "image/png"))],
                              data={"top_k": "2"}, timeout=60)
        assert response.status_code == 200, response.text
        manifest = load_artifact(artifact_dir).manifest
        body = response.json()
        assert body["model"] == {"name": manifest.name, "version": manifest.version}
        assert {s["label"] for s in body["predictions"][0]["top_k"]} <= set(manifest.labels)
    finally:
        stop_server(process)
    served_from = log.read_text()
    assert "No module named" not in served_from
