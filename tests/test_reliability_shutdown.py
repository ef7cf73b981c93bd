"""Graceful shutdown: on SIGTERM readiness goes false and new connections are refused at once (not left
hanging), while a request already in flight still gets its 200; then the server exits."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.bentoml_compat import stop_listening
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

