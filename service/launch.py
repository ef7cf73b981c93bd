"""Starting the HTTP server as a process of its own: what `transfer-serve serve ARTIFACT` runs, and a local
server on a free loopback port for tests and benchmarks (`local_server`).

The server is BentoML's (`bentoml serve service.service:TransferServe`); it reads its configuration from
`TRANSFER_SERVE_*` variables in every worker, so the settings travel in the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

from models.memory import ALLOCATOR_ENV
from service.settings import ENV_PREFIX, ServiceSettings

SERVICE_IMPORT = "service.service:TransferServe"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def server_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT,
        "--host", host, "--port", str(port), "--working-dir", str(PROJECT_ROOT),
    ]  # fmt: skip


def server_env(settings: ServiceSettings, base: Mapping[str, str]) -> dict[str, str]:
    """`base` with its `TRANSFER_SERVE_*` variables replaced by those that reproduce `settings`.
    BentoML's usage tracking is off unless `base` turns it on (the server may have no internet); glibc's arenas
    are capped (`MALLOC_ARENA_MAX`) unless `base` sets them."""
    env = {key: value for key, value in base.items() if not key.startswith(ENV_PREFIX)}
    env.update(settings.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    for key, value in ALLOCATOR_ENV.items():  # glibc gives decoding memory back (models/memory.py)
        env.setdefault(key, value)
    return env


class ServerStartError(RuntimeError):
    """The local server exited or did not become ready; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server (BentoML stops its workers and drains), then kill whatever of it is left."""
    import psutil

    try:
        family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [process.pid]
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)


@contextlib.contextmanager
def local_server(
    artifact: Path, home: Path, *options: str, ready_timeout_s: float = 180.0, **settings: str
) -> Iterator[str]:
    """`transfer-serve serve ARTIFACT` as a subprocess on a free 127.0.0.1 port, for tests and benchmarks.

    `settings` are extra environment variables (e.g. TRANSFER_SERVE_MAX_BATCH_SIZE="1"); BentoML's home is
    `home`, where the server's log goes too. Yields the base URL once /readyz answers 200; always stopped."""
    import httpx

    port = free_port()
    log = home / f"server-{port}.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env |= settings | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    command = [sys.executable, "-m", "cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as output:
        process = subprocess.Popen([*command, *options], env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise ServerStartError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not ready after {ready_timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_server(process)
