"""Contract tests for service/bentoml_compat.py: what it relies on of BentoML's and uvicorn's internals is
still there and still behaves as it did. A bentoml or uvicorn upgrade that changes any of it fails here,
by name, instead of silently changing the service's error bodies, OpenAPI page or shutdown."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
from http import HTTPStatus
from typing import Any

import bentoml
import pytest
import uvicorn
from bentoml import IODescriptor
from bentoml.exceptions import BentoMLException
from starlette.testclient import TestClient

from service import bentoml_compat
from service.bentoml_compat import (
    TESTED_VERSIONS,
    IncompatibleInternals,
    JSONErrorBody,
    check_compatibility,
    error_message,
    installed_versions,
    major_minor,
    missing_internals,
    refuse_new_connections_on_shutdown,
)
from service.bento_io import ClassifyInput, ClassifyOutput
from service.uploads import UploadLimits

# --- versions and attributes -------------------------------------------------------------------------------------


def test_installed_versions_are_the_tested_ones():
    installed = {package: major_minor(version) for package, version in installed_versions().items()}
    assert installed == TESTED_VERSIONS, (
        "bentoml/uvicorn differ from what service/bentoml_compat.py was tested with: make this file pass, "
        "then update TESTED_VERSIONS"
    )


def test_every_internal_relied_upon_is_present():
    assert missing_internals() == []


def test_untested_version_with_internals_present_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="bentoml.transfer_serve"):
        check_compatibility({"bentoml": "1.5.0", "uvicorn": TESTED_VERSIONS["uvicorn"] + ".0"})
    assert "not bentoml 1.5.0" in caplog.text


def test_untested_version_with_an_internal_gone_raises_naming_it(monkeypatch):
    monkeypatch.setitem(bentoml_compat.IO_DESCRIPTOR_HOOKS, "from_http_request_v2", ("request",))
    with pytest.raises(IncompatibleInternals, match="from_http_request_v2"):
        check_compatibility({"bentoml": "2.0.0", "uvicorn": "0.54.0"})
    check_compatibility({"bentoml": TESTED_VERSIONS["bentoml"] + ".9", "uvicorn": TESTED_VERSIONS["uvicorn"] + ".1"})


# --- 1. IO descriptor hooks --------------------------------------------------------------------------------------


def test_bentoml_calls_the_overridden_io_hooks():
    from _bentoml_impl.server.app import ServiceAppFactory

    endpoint = inspect.getsource(ServiceAppFactory.api_endpoint)
    assert "input_spec.from_http_request(request, serde)" in endpoint
    assert "output_spec.to_http_response(" in endpoint
    for hook, parameters in bentoml_compat.IO_DESCRIPTOR_HOOKS.items():
        assert tuple(inspect.signature(getattr(IODescriptor, hook)).parameters) == parameters, hook


def test_input_documents_the_multipart_wire_body():
    bound = ClassifyInput.with_limits(UploadLimits(max_images=2, max_pixels=100, max_body_bytes=1000))
    assert bound.__name__ == "ClassifyInput" and bound.limits.max_images == 2 and issubclass(bound, ClassifyInput)
    assert bound.multipart_fields == ["images"] and bound.mime_type() == "multipart/form-data"
    components = bound.openapi_components("classify")
    assert set(components["ClassifyInput"].properties) == {"images", "top_k", "unknown_label"}  # the form, not the batch items


# --- 2. BentoML's client-error bodies, and the rewrite ------------------------------------------------------------


class _ProbeError(BentoMLException):
    error_code = HTTPStatus.BAD_REQUEST


def _probe_service():
    @bentoml.service(name="compat-probe")
    class Probe:
        started = False

        @bentoml.on_startup
        def mark_started(self) -> None:
            type(self).started = True

        @bentoml.api
        def fail(self, n: int) -> int:
            raise _ProbeError(f"bad n={n}")

    return Probe


def test_bentoml_client_error_bodies_and_their_rewrite():
    probe = _probe_service()
    app = probe.to_asgi()  # once per process: BentoML registers its metrics globally
    with TestClient(app) as raw:
        assert probe.inner.started, "@bentoml.on_startup hooks run when the app starts"
        listed = raw.post("/fail", json={"n": 1})
        validation = raw.post("/fail", json={"n": "x"})
        rewritten = TestClient(JSONErrorBody(app))  # what add_asgi_middleware(JSONErrorBody) puts in front
        rewritten_listed = rewritten.post("/fail", json={"n": 1})
        rewritten_validation = rewritten.post("/fail", json={"n": "x"})
    assert (listed.status_code, listed.json()) == (400, [{"error": "bad n=1"}])  # bentoml/BentoML#4232
    assert validation.status_code == 400
    assert validation.json()["error"] == "1 validation error for Input"
    assert validation.json()["detail"][0]["loc"] == ["n"] and validation.json()["detail"][0]["msg"]
    assert error_message(listed.json()) == "bad n=1"
    assert error_message(validation.json()).startswith("n: Input should be a valid integer")

    assert (rewritten_listed.status_code, rewritten_listed.json()) == (400, {"error": "bad n=1"})
    body = rewritten_validation.json()
    assert list(body) == ["error"] and body["error"].startswith("n: Input should be a valid integer")


def test_merging_output_merges_one_requests_share():
    from _bentoml_impl.serde import ALL_SERDE

    from models.predictor import TopK
    from service.schemas import ClassifyResponse, ModelRef

    model = ModelRef(name="m", version="1")
    parts = [ClassifyResponse.for_image(model, TopK(labels=[c], probabilities=[0.5])) for c in "ab"]
    response = asyncio.run(ClassifyOutput.to_http_response(parts, ALL_SERDE["application/json"]()))
    body = b"".join(bytes(chunk) for chunk in response.body_iterator)
    assert [p["top_k"][0]["label"] for p in json.loads(body)["predictions"]] == ["a", "b"]


# --- 3. uvicorn's shutdown ---------------------------------------------------------------------------------------


def test_bentoml_workers_run_uvicorn_server_which_awaits_shutdown():
    import _bentoml_impl.worker.service as worker

    assert "uvicorn.Server(config).run(" in inspect.getsource(worker)
    assert "await self.shutdown(sockets=sockets)" in inspect.getsource(uvicorn.Server._serve)


def test_shutdown_wrapper_runs_callbacks_stops_listening_then_drains(monkeypatch):
    monkeypatch.setattr(uvicorn.Server, "shutdown", uvicorn.Server.shutdown)  # restored after the test
    calls: list[str] = []
    refuse_new_connections_on_shutdown(lambda: calls.append("first"))
    wrapper = uvicorn.Server.shutdown
    refuse_new_connections_on_shutdown(lambda: calls.append("second"))
    assert uvicorn.Server.shutdown is wrapper, "installed once per process"

    async def app(scope, receive, send) -> None:  # pragma: no cover - never called
        raise AssertionError

    async def serve_then_shut_down() -> int:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="error"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        assert server.servers and all(s.sockets for s in server.servers), "uvicorn's Server.servers"
        port = server.servers[0].sockets[0].getsockname()[1]
        server.should_exit = True  # uvicorn's main loop ends, then it awaits self.shutdown(sockets=...)
        await serving
        return port

    port = asyncio.run(serve_then_shut_down())
    assert calls == ["first", "second"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_service_installs_the_shutdown_wrapper_from_its_startup_hook_not_at_import():
    from service.service import TransferServe

    assert not hasattr(uvicorn.Server.shutdown, "_before_shutdown"), "importing the service patches nothing"
    assert getattr(TransferServe.inner.refuse_new_connections_on_shutdown, "__bentoml_startup_hook__", False)
    assert JSONErrorBody in [middleware for middleware, _ in TransferServe.middlewares]


# --- 4. HTTP hardening: metrics labels, the guarded h11 protocol, one-line client errors ---------------------------


def test_bentoml_metrics_middleware_is_a_class_bentoml_imports_when_it_builds_an_app():
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http import instruments

    installed = instruments.RunnerTrafficMetricsMiddleware
    original = next(c for c in installed.__mro__ if not getattr(c, "route_labelled", False) or c is object)
    assert inspect.isclass(original) and original.__name__ == "RunnerTrafficMetricsMiddleware"
    assert tuple(inspect.signature(original.__call__).parameters) == ("self", "scope", "receive", "send")
    assert list(inspect.signature(original.__init__).parameters)[:2] == ["self", "app"]
    builds = inspect.getsource(ServiceAppFactory.middlewares.fget)
    assert "from bentoml._internal.server.http.instruments import" in builds, "imported lazily, when the app is built"
    assert 'endpoint = scope["path"]' in inspect.getsource(original.__call__), "BentoML labels by the raw path"
    setup = inspect.getsource(original._setup)
    for name in bentoml_compat.METRICS_SETUP_ATTRIBUTES:  # RouteLabelledMetrics creates their <unmatched> series
        assert f"self.{name} = " in setup, name


def test_metrics_are_labelled_by_route_or_unmatched():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route, WebSocketRoute

    async def ok(request):  # pragma: no cover - never called
        return PlainTextResponse("")

    app = Starlette(routes=[Route("/items/{n}", ok), Mount("/static_content", app=ok), WebSocketRoute("/ws", ok)])

    def label(path: str, kind: str = "http", method: str = "GET") -> str | None:
        return bentoml_compat.route_label({"type": kind, "path": path, "method": method, "app": app, "root_path": ""})

    assert label("/items/7") == "/items/{n}"
    assert label("/items/7", method="DELETE") == "/items/{n}"  # a 405 keeps its route's label
    assert label("/static_content/" + "x" * 50) == "/static_content"
    assert label("/ws", kind="websocket") == "/ws"
    assert label("/nope-123") == label("/ws-456", kind="websocket") == "<unmatched>"
    assert bentoml_compat.route_label({"type": "http", "path": "/x"}) is None


def test_route_labelled_metrics_install_once_and_pass_the_original_scope():
    from bentoml._internal.server.http import instruments

    installed = bentoml_compat.install_route_labelled_metrics()
    assert bentoml_compat.install_route_labelled_metrics() is installed is instruments.RunnerTrafficMetricsMiddleware
    assert installed.route_labelled and installed.__mro__[1].__name__ == "RunnerTrafficMetricsMiddleware"
    seen: list[str] = []

    async def inner(scope, receive, send) -> None:
        seen.append(scope["path"])

    middleware = installed(inner)
    middleware._is_setup = True  # skip BentoML's metric registration: only the scope hand-over is checked here
    asyncio.run(middleware.app({"type": "http", "path": "<unmatched>", bentoml_compat._ORIGINAL_SCOPE: {
        "type": "http", "path": "/raw"}}, None, None))  # fmt: skip
    assert seen == ["/raw"]


def test_uvicorn_h11_protocol_has_what_the_guard_overrides():
    import h11
    import uvicorn.config
    from uvicorn.protocols.http import auto
    from uvicorn.protocols.http.h11_impl import H11Protocol

    for method in bentoml_compat.GUARDED_H11_METHODS:
        assert callable(getattr(H11Protocol, method)), method
    assert isinstance(h11.Connection.their_state, property)
    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "uvicorn.protocols.http.auto:AutoHTTPProtocol"
    assert hasattr(auto, "AutoHTTPProtocol")
    handle_events = inspect.getsource(H11Protocol.handle_events)
    assert "except h11.RemoteProtocolError" in handle_events and "self.send_400_response(" in handle_events
    assert "timeout_keep_alive_task = self.loop.call_later" in inspect.getsource(H11Protocol.on_response_complete)


def _ok_app():
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _serve_guarded(header_timeout_s: float, probe, app=None, send_timeout_s: float | None = None) -> Any:
    """Run an in-process uvicorn server with `GuardedH11Protocol` (serving `app`, by default one answering "ok")
    on a free loopback port; `probe(port)` runs in a thread while it serves. Returns what the probe returns."""

    async def run() -> Any:
        config = uvicorn.Config(app or _ok_app(), host="127.0.0.1", port=0, lifespan="off", log_level="error",
                                http=bentoml_compat.GuardedH11Protocol)  # fmt: skip
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            return await asyncio.to_thread(probe, port)
        finally:
            server.should_exit = True
            await serving

    protocol = bentoml_compat.GuardedH11Protocol
    original = protocol.header_timeout_s, protocol.send_timeout_s
    protocol.header_timeout_s = header_timeout_s
    protocol.send_timeout_s = send_timeout_s or original[1]
    try:
        return asyncio.run(run())
    finally:
        protocol.header_timeout_s, protocol.send_timeout_s = original


def test_guarded_protocol_aborts_a_response_the_client_does_not_read():
    """A client that requests a large answer and never reads: the app's sends stop blocking (the connection is
    aborted) about `send_timeout_s` after the send buffer filled, instead of never."""
    import threading
    import time

    finished = threading.Event()

    async def large_answer(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        chunk = b"x" * (1 << 20)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(64 * len(chunk)).encode())]})
        for _ in range(64):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        finished.set()

    def probe(port: int) -> float | None:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", port))
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            start = time.monotonic()
            return time.monotonic() - start if finished.wait(6) else None  # never reads a byte

    waited = _serve_guarded(60, probe, app=large_answer, send_timeout_s=0.5)
    assert waited is not None and waited < 4, waited


def _seconds_until_eof(sock: socket.socket, limit_s: float) -> float | None:
    import time

    start = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - start


def test_guarded_protocol_closes_a_stalled_head_and_answers_an_oversized_one_with_431():
    def probe(port: int) -> tuple[float | None, float | None, bytes]:
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle_closed = _seconds_until_eof(idle, 5)
        with socket.create_connection(("127.0.0.1", port)) as partial:
            partial.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            partial_closed = _seconds_until_eof(partial, 5)
        with socket.create_connection(("127.0.0.1", port)) as big:
            big.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
            big.settimeout(5)
            answer = b""
            while chunk := big.recv(65536):
                answer += chunk
        return idle_closed, partial_closed, answer

    idle_closed, partial_closed, answer = _serve_guarded(0.5, probe)
    assert idle_closed is not None and 0.3 < idle_closed < 3
    assert partial_closed is not None and 0.3 < partial_closed < 3
    assert answer.startswith(b"HTTP/1.1 431 ") and b"connection: close" in answer.lower()
    assert answer.endswith(b'{"error": "request header fields too large"}')


def test_service_installs_the_http_guards_at_import():
    from bentoml._internal.server.http import instruments
    from uvicorn.protocols.http import auto

    from service.request_guard import RequestGuard
    from service.service import TransferServe

    assert auto.AutoHTTPProtocol is bentoml_compat.GuardedH11Protocol
    assert getattr(instruments.RunnerTrafficMetricsMiddleware, "route_labelled", False)
    assert [middleware for middleware, _ in TransferServe.middlewares][0] is RequestGuard


def _log_record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        import sys

        exc_info = sys.exc_info()
    return logging.LogRecord(bentoml_compat.BENTOML_HTTP_APP_LOGGER, logging.ERROR, __file__, 1,
                             "Exception on %s [%s]", ("/classify", "POST"), exc_info)  # fmt: skip


def test_client_errors_become_one_warning_line_and_server_errors_keep_their_traceback():
    from pydantic import BaseModel as Model

    class Strict(Model):
        n: int

    try:
        Strict(n="x")
    except Exception as exc:  # pydantic.ValidationError
        validation = exc
    one_line = bentoml_compat.ClientErrorsOneLine()
    client = _log_record(_ProbeError("bad n=1\nsecond line"))
    assert one_line.filter(client) and client.levelno == logging.WARNING and client.exc_info is None
    assert client.getMessage() == "Exception on /classify [POST] -> 400 bad n=1"
    pydantic_error = _log_record(validation)
    assert one_line.filter(pydantic_error) and pydantic_error.getMessage().startswith(
        "Exception on /classify [POST] -> 400 1 validation error for Strict"
    )
    for server_error in (RuntimeError("boom"), BentoMLException("internal")):  # BentoMLException: 500
        record = _log_record(server_error)
        assert one_line.filter(record) and record.levelno == logging.ERROR and record.exc_info is not None


def test_the_log_filter_is_installed_on_bentomls_http_app_logger_once():
    from bentoml._internal.server import http_app

    assert http_app.logger.name == bentoml_compat.BENTOML_HTTP_APP_LOGGER
    assert "exc_info" in inspect.getsource(http_app.log_exception)
    logger = logging.getLogger(bentoml_compat.BENTOML_HTTP_APP_LOGGER)
    try:
        bentoml_compat.log_client_errors_in_one_line()
        bentoml_compat.log_client_errors_in_one_line()
        assert sum(isinstance(f, bentoml_compat.ClientErrorsOneLine) for f in logger.filters) == 1
    finally:
        logger.removeFilter(bentoml_compat._CLIENT_ERRORS_ONE_LINE)
