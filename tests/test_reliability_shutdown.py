"""Graceful shutdown: on SIGTERM readiness goes false and new connections are refused at once (not left
hanging), while a request already in flight still gets its 200; then the server exits. Ungraceful ends: SIGKILL of
the server leaves no worker behind, and a server whose workers cannot start exits non-zero (issue 21, items 3, 5)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.bentoml_compat import stop_listening
from service.launch import SERVICE_IMPORT, free_port
from service.worker_lifetime import FAILED_STARTS_EXIT_CODE, MAX_FAILED_STARTS
from test_reliability_extraction_hostile import kill_leftovers
from test_service import SERVER_ENV, running_server

pytestmark = pytest.mark.slow


def server_process(port: int) -> psutil.Process:
    """The `bentoml serve` process (the one SIGTERM goes to) that this test session started on `port`."""
    for child in psutil.Process().children():
        if "bentoml" in " ".join(child.cmdline()) and str(port) in child.cmdline():
            return child
    raise AssertionError(f"no server process on port {port}")


def multipart(client: httpx.Client, image: bytes) -> tuple[bytes, bytes]:
    request = client.build_request("POST", "/classify", files=[("images", ("a.png", image, "image/png"))] * 8)
    body = request.read()
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {request.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def read_response(connection: socket.socket) -> bytes:
    connection.settimeout(60)
    data = b""
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        if length and len(rest) >= length[0]:
            return data


def test_sigterm_finishes_in_flight_refuses_new_and_exits(artifact_dir: Path, digits_dir: Path, tmp_path: Path):
    image = sorted((digits_dir / "1").glob("*.png"))[0].read_bytes()
    with running_server(artifact_dir, tmp_path, **SERVER_ENV) as client:
        port = client.base_url.port
        process = server_process(port)
        head, body = multipart(client, image)  # a max-size request (8 images), sent in two parts
        in_flight = socket.create_connection(("127.0.0.1", port))
        in_flight.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)  # the server has read the headers: the request is in flight

        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):  # refused at once, not a hang until the drain ends
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://127.0.0.1:{port}/classify", files=[("images", ("a.png", image, "image/png"))], timeout=10)
        assert time.monotonic() - started < 5

        in_flight.sendall(body[len(body) // 2 :])
        response = read_response(in_flight)
        in_flight.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        assert response.count(b'"top_k"') == 8

        process.wait(timeout=60)  # then the whole server exits by itself


def test_stop_listening_makes_the_shared_socket_refuse_connections():
    """The mechanism: shutting down a dup of a listening socket stops every copy (the process manager's too)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    shared = socket.socket(fileno=listener.fileno())  # like the worker's socket from BentoML's fd

    class Server:
        sockets = [shared]

    socket.create_connection(("127.0.0.1", port)).close()  # listening
    stop_listening([Server()])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    shared.detach()
    listener.close()



ROOT = Path(__file__).resolve().parents[1]


def _server_env(home: Path, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRANSFER_SERVE_")}
    return env | settings | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(ROOT)}


def test_sigkill_of_serve_ends_its_workers_and_frees_the_port(artifact_dir: Path, tmp_path: Path):
    """`kill -9` of `transfer-serve serve` (which becomes `bentoml serve`): no worker is left answering."""
    port = free_port()
    command = [sys.executable, "-m", "cli", "serve", str(artifact_dir), "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=_server_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server not ready after 180 s"
            time.sleep(0.5)
        family = psutil.Process(server.pid).children(recursive=True)
        assert family, "no worker process"
        server.kill()
        server.wait(10)
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"still running 15 s after the server was killed: {alive}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    finally:
        kill_leftovers(server, family)


def test_bentoml_serve_exits_non_zero_after_a_few_failed_worker_starts(artifact_dir: Path, tmp_path: Path):
    """An artifact every worker refuses (its ONNX graph rejects the manifest's input size): `bentoml serve` stops
    with FAILED_STARTS_EXIT_CODE after MAX_FAILED_STARTS starts, instead of restarting the worker forever."""
    broken = tmp_path / "artifact"
    shutil.copytree(artifact_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["preprocessing"]["image_size"] = 48
    (broken / "manifest.json").write_text(json.dumps(manifest))
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", "127.0.0.1", "--port",
               str(free_port()), "--working-dir", str(ROOT)]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=_server_env(tmp_path, TRANSFER_SERVE_ARTIFACT=str(broken)),
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while server.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                family += psutil.Process(server.pid).children(recursive=True)
            assert time.monotonic() < deadline, f"still restarting after 300 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        text = log_path.read_text()
        assert server.returncode == FAILED_STARTS_EXIT_CODE, text[-3000:]
        assert f"error: the server stopped: {MAX_FAILED_STARTS} worker start(s) failed in a row" in text
        assert "refuses the manifest's 48x48 input" in text
    finally:
        kill_leftovers(server, family)
