"""HTTP edges of a real server, over raw loopback sockets: slow or stalled clients are cut off, an oversized head
gets a 431 it can read, Content-Length with Transfer-Encoding is refused, unknown paths (HTTP and WebSocket) share
one metrics label, and client errors are logged as one line without a traceback.

One server for the module, started with short timeouts (header and body: 2 s) so that the whole file stays
well under two minutes. Every loop is bounded and every connection is to 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from test_service import SERVER_ENV, running_server

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 5.0  # uvicorn's default, which BentoML keeps
SLACK_S = 3.0  # a loaded two-core machine: how late a timeout may act and still pass


@dataclass
class EdgeServer:
    client: httpx.Client
    address: tuple[str, int]
    home: Path

    def log_size(self) -> int:
        return sum(path.stat().st_size for path in self.home.glob("server-*.log"))

    def log_since(self, offset: int) -> str:
        text = b"".join(path.read_bytes() for path in sorted(self.home.glob("server-*.log")))
        return text[offset:].decode("utf-8", "replace")


@pytest.fixture(scope="module")
def edge_server(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("http_edges_home")
    settings = SERVER_ENV | {
        "TRANSFER_SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "TRANSFER_SERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    with running_server(artifact_dir, home, **settings) as client:
        url = httpx.URL(str(client.base_url))
        assert url.host == "127.0.0.1"
        yield EdgeServer(client, (url.host, url.port), home)


# --- raw-socket helpers ------------------------------------------------------------------------------------------


def connect(server: EdgeServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=10)


def seconds_until_closed(sock: socket.socket, limit_s: float, trickle: bytes = b"", every_s: float = 0.5) -> float | None:
    """Seconds until the server closes `sock` (EOF, reset or a failed send), sending `trickle` every `every_s`
    meanwhile; None when it is still open after `limit_s`. What the server sends before closing is discarded."""
    start = time.monotonic()
    sock.settimeout(every_s)
    while (elapsed := time.monotonic() - start) < limit_s:
        try:
            if trickle:
                sock.sendall(trickle)
            if sock.recv(65536) == b"":
                return elapsed
        except socket.timeout:
            continue
        except OSError:  # reset, broken pipe
            return time.monotonic() - start
    return None


def read_response(sock: socket.socket, limit_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and Content-Length body of the next response on `sock`."""
    sock.settimeout(limit_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head; got {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


# --- 2. timeouts -------------------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(edge_server):
    with connect(edge_server) as sock:
        closed = seconds_until_closed(sock, HEADER_TIMEOUT_S + 2 * SLACK_S)
    assert closed is not None, "an idle new connection was held open"
    assert HEADER_TIMEOUT_S - 0.5 <= closed <= HEADER_TIMEOUT_S + SLACK_S


def test_a_head_trickled_a_line_at_a_time_is_closed_after_the_header_timeout(edge_server):
    with connect(edge_server) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = seconds_until_closed(sock, HEADER_TIMEOUT_S + 2 * SLACK_S, trickle=b"X-Slow: 1\r\n")
    assert closed is not None, "a head trickled a line every 0.5 s was held open"
    assert closed <= HEADER_TIMEOUT_S + SLACK_S


def test_a_body_trickled_a_byte_at_a_time_gets_408_and_the_connection_closes(edge_server):
    with connect(edge_server) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        start = time.monotonic()
        answered: list[tuple[int, dict[str, str], bytes]] = []
        reader = threading.Thread(target=lambda: answered.append(read_response(sock, BODY_TIMEOUT_S + 2 * SLACK_S)))
        reader.start()
        while reader.is_alive() and time.monotonic() - start < BODY_TIMEOUT_S + 2 * SLACK_S:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            reader.join(0.5)
        reader.join(SLACK_S)
        assert answered, "no response while the body trickled"
        status, headers, body = answered[0]
        elapsed = time.monotonic() - start
        assert status == 408, (status, body)
        assert "not received within" in json.loads(body)["error"]
        assert headers.get("connection") == "close"
        assert elapsed <= BODY_TIMEOUT_S + SLACK_S
        assert seconds_until_closed(sock, SLACK_S) is not None, "the connection stayed open after the 408"


def test_an_unread_body_trickled_after_an_early_answer_is_closed(edge_server):
    """The server answers an unknown path without reading the body; the client keeps trickling it."""
    with connect(edge_server) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nx")
        status, _, _ = read_response(sock)
        assert status == 404
        closed = seconds_until_closed(sock, HEADER_TIMEOUT_S + 2 * SLACK_S, trickle=b"x")
    assert closed is not None, "a connection trickling an unread body was held open"
    assert closed <= HEADER_TIMEOUT_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed_after_five_seconds(edge_server):
    with connect(edge_server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"
        closed = seconds_until_closed(sock, KEEP_ALIVE_S + 2 * SLACK_S)
    assert closed is not None, "an idle keep-alive connection was held open"
    assert KEEP_ALIVE_S - 1 <= closed <= KEEP_ALIVE_S + SLACK_S


# --- 3. oversized head -------------------------------------------------------------------------------------------


def test_a_megabyte_header_gets_431_and_a_clean_close(edge_server):
    request = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    with connect(edge_server) as sock:
        send_error: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(request)  # the client finishes sending before it reads, as most do
            except OSError as exc:
                send_error.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        sender.join(10)
        status, headers, body = read_response(sock)
        assert not send_error, f"the server reset the connection while the head was sent: {send_error}"
        assert status == 431, (status, body)
        assert headers.get("connection") == "close"
        assert "too large" in json.loads(body)["error"]
        assert sock.recv(65536) == b"", "a clean EOF after the 431, not a reset"
    assert edge_server.client.get("/livez").status_code == 200


# --- 4. request smuggling ----------------------------------------------------------------------------------------


def test_content_length_with_chunked_transfer_encoding_is_refused_and_closed(edge_server):
    with connect(edge_server) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        assert status == 400, (status, body)
        assert "Transfer-Encoding" in json.loads(body)["error"]
        assert headers.get("connection") == "close"
        assert seconds_until_closed(sock, SLACK_S) is not None


# --- 1. metrics labels -------------------------------------------------------------------------------------------


def metric_endpoints(client: httpx.Client) -> set[str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return set(re.findall(r'endpoint="([^"]*)"', response.text))


def test_unknown_http_and_websocket_paths_share_one_metrics_label(edge_server):
    client = edge_server.client
    for _ in range(30):
        assert client.get(f"/{uuid.uuid4().hex}").status_code == 404
        assert client.post(f"/static_content/{uuid.uuid4().hex}").status_code in (404, 405)
    for _ in range(3):
        with connect(edge_server) as sock:
            sock.sendall(
                f"GET /ws-{uuid.uuid4().hex} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            status, _, _ = read_response(sock)
            assert status == 403
    endpoints = metric_endpoints(client)
    assert "<unmatched>" in endpoints
    assert not [e for e in endpoints if re.search(r"[0-9a-f]{32}", e)], sorted(endpoints)
    assert endpoints <= {
        "<unmatched>", "/classify", "/embed", "/metadata", "/livez", "/readyz", "/healthz", "/metrics",
        "/static_content", "/docs.json", "/schema.json", "/",
    }, sorted(endpoints)  # fmt: skip


# --- 5. logging --------------------------------------------------------------------------------------------------


def wait_for_log(server: EdgeServer, offset: int, pattern: str, count: int, limit_s: float = 10.0) -> str:
    deadline = time.monotonic() + limit_s
    while True:
        text = server.log_since(offset)
        if len(re.findall(pattern, text)) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_client_errors_are_logged_as_one_warning_line_without_a_traceback(edge_server):
    client = edge_server.client
    offset = edge_server.log_size()
    bad = [
        client.post("/classify", json={"top_k": 2}),  # missing images: a RequestError
        client.post("/embed", content=b"{", headers={"content-type": "application/json"}),
        client.post("/classify", json={"images": ["not base64!"]}),
    ]
    assert [response.status_code for response in bad] == [400, 400, 400], [r.text for r in bad]
    pattern = r"Exception on /(?:classify|embed) \[POST\]"
    text = wait_for_log(edge_server, offset, pattern, len(bad))
    lines = [line for line in text.splitlines() if re.search(pattern, line)]
    assert len(lines) == len(bad), text[-3000:]
    assert all("WARNING" in line and "-> 400" in line for line in lines), lines
    assert "Traceback" not in text, text[-3000:]
