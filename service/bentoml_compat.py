"""Every reliance of the service on BentoML's and uvicorn's non-public behaviour, in one place.

BentoML 1.4 has no documented way to do three things the service needs, so this module leans on
internals, each checked by tests/test_bentoml_compat.py so that an upgrade that changes them fails loudly:

1. **Parsing a request before it joins a batch.** `RequestParsingInput` overrides the IODescriptor hooks
   `from_http_request` (parse the request with our own code instead of BentoML's serde), `model_json_schema`
   (document the wire body, not the internal batch items) and `multipart_fields` (documented as
   multipart/form-data); `MergingOutput` overrides `to_http_response` (merge one request's share of a
   batch's one-image answers). These are class-definition overrides, so they take effect at import.
2. **One client-error body.** BentoML 1.4 answers a `BentoMLException` with a one-element JSON array
   `[{"error": msg}]` (bentoml/BentoML#4232) and its own validation errors with
   `{"error": "1 validation error for Input", "detail": [...]}`, from inside its endpoint wrapper: no
   exception handler can be registered there. `JSONErrorBody`, an ASGI middleware added through the
   public `add_asgi_middleware`, rewrites both into the documented `{"error": "..."}`.
3. **Refusing new connections on shutdown.** `refuse_new_connections_on_shutdown` wraps
   `uvicorn.Server.shutdown` for the worker process and reads uvicorn's `Server.servers` (the asyncio
   servers and their listening sockets); see its docstring. It is installed from the service's
   `@bentoml.on_startup` hook, in the worker, never at import.

4. **HTTP hardening the server's options cannot express** (BentoML passes uvicorn no parser limit or
   timeout, and user middlewares sit inside its metrics middleware):
   - `RouteLabelledMetrics` replaces `bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware`
     so that the `endpoint` label of BentoML's request metrics is the matched route's path, or `<unmatched>`,
     never the raw client-chosen path (HTTP and WebSocket);
   - `GuardedH11Protocol` replaces uvicorn's `AutoHTTPProtocol` (h11): a request head must be complete
     `header_timeout_s` after the connection opens (or after the first byte following a response), and a
     parser error is answered with h11's status (431 for an oversized head) before a lingering close;
   - `ClientErrorsOneLine` filters BentoML's `bentoml._internal.server.http_app` logger: a client error
     (4xx) is one WARNING line, a server error keeps its traceback.
   The first two must be in place before the worker builds its app and its `uvicorn.Config` is loaded,
   which is before any BentoML hook runs in the worker (`@bentoml.on_startup` runs in the app's lifespan,
   after both; `@bentoml.on_deployment` runs once, in the parent process, not in the workers). So
   `install_http_guards` runs when service/service.py is imported, which every worker does first
   (`_bentoml_impl/worker/service.py`: `load()` comes before `to_asgi()` and `uvicorn.Config`). The log
   filter is installed by the startup hook (`install_in_worker`).

5. **A bound on the wait adaptive batching learns** (`bound_batch_wait`, wrapping the dispatcher's
   `Optimizer.trigger_refresh`; called when service/service.py is imported, before any dispatcher exists).
   A bound on the wait BentoML's adaptive batching learns, so latency recovers after a burst.
   
   BentoML 1.4's dispatcher (`bentoml._internal.marshal.dispatcher`) holds a request back, while the model is
   idle, for as long as `Optimizer.wait`: the mean of the last 50 batches' "wait", the time from the first
   request's arrival to the start of its batch, refreshed at most every 5 s. Under load that time is mostly
   queueing behind the batch in progress (the model is busy), not a wait that filled a batch; yet afterwards a
   lone request is held for about 0.95x that much before it runs, and that hold is measured as the next
   batches' wait, so the estimate only shrinks by ~5% (plus one image's compute) per refresh: one client after
   16 concurrent ones was held ~30-50 ms per request (measured, docs/BENCHMARKS.md) and took minutes to recover.
   `max_latency_ms` does not bound this wait (it only cancels requests that waited longer), and BentoML 1.4 has
   no setting for it (a `target_latency_ms` batching strategy was proposed upstream, bentoml/BentoML#3630, and
   not merged).
   
   `bound_batch_wait(seconds)` caps the learned wait at each refresh. With 0 (the default,
   TRANSFER_SERVE_MAX_BATCH_WAIT_MS), a batch starts as soon as the model is free and takes every request that
   queued meanwhile (up to the max batch size): batches still form under load, from the requests that arrived
   while the previous batch ran, and a lone request never waits for company.

6. **Where the code runs: worker or serving process** (for service/worker_lifetime.py, which makes workers die
   with their server and stops a server whose workers cannot start). `in_worker()` reads
   `bentoml._internal.context.server_context.worker_index` (set in a worker before it imports the service);
   `workers_are_restarted()` reads `bentoml.serving.running_inside_container` (inside a container BentoML does
   not let circus restart a worker that exited).

`check_compatibility()` (run by the startup hook) compares the installed bentoml and uvicorn with
`TESTED_VERSIONS`: a different major.minor logs a warning when every attribute relied upon is still there,
and raises `IncompatibleInternals` naming what is missing when one is not.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import socket
import sys
from http import HTTPStatus
from importlib import metadata
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import h11
from bentoml import IODescriptor
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ValidationError
from starlette.routing import Match
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import capped, describe_validation_errors

logger = logging.getLogger("bentoml.transfer_serve")

TESTED_VERSIONS: dict[str, str] = {"bentoml": "1.4", "uvicorn": "0.55"}
"""major.minor of the packages whose internals this module was written and tested against."""

IO_DESCRIPTOR_HOOKS: dict[str, tuple[str, ...]] = {
    "from_http_request": ("request", "serde"),
    "to_http_response": ("obj", "serde"),
    "model_json_schema": ("args", "kwargs"),
}
"""The IODescriptor class methods overridden here, with the parameters BentoML calls them with."""


class IncompatibleInternals(RuntimeError):
    """An installed bentoml or uvicorn no longer has what this module relies on."""


# --- version guard -----------------------------------------------------------------------------------------------


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def installed_versions() -> dict[str, str]:
    return {package: metadata.version(package) for package in TESTED_VERSIONS}


def in_worker() -> bool:
    """True inside a BentoML HTTP worker (False in the serving process, `bentoml build`, tests). Section 6."""
    from bentoml._internal.context import server_context

    return server_context.worker_index is not None


def workers_are_restarted() -> bool:
    """Whether BentoML's circus restarts a worker that exited (not inside a container). Section 6."""
    from bentoml.serving import running_inside_container

    return not running_inside_container()


def missing_internals() -> list[str]:
    """What this module relies on that the installed bentoml and uvicorn lack (empty when all is there)."""
    import uvicorn

    missing = []
    for hook, parameters in IO_DESCRIPTOR_HOOKS.items():
        method = getattr(IODescriptor, hook, None)
        if method is None or tuple(inspect.signature(method).parameters) != parameters:
            missing.append(f"bentoml IODescriptor.{hook}{parameters}")
    if not any("multipart_fields" in vars(base).get("__annotations__", {}) for base in IODescriptor.__mro__):
        missing.append("bentoml IODescriptor.multipart_fields")
    shutdown = getattr(uvicorn.Server, "shutdown", None)
    if not inspect.iscoroutinefunction(shutdown) or "sockets" not in inspect.signature(shutdown).parameters:
        missing.append("uvicorn Server.shutdown(sockets=...) coroutine")
    if "self.servers" not in inspect.getsource(uvicorn.Server):
        missing.append("uvicorn Server.servers")
    missing += _missing_http_internals()
    from bentoml._internal.marshal import dispatcher

    optimizer = getattr(dispatcher, "Optimizer", None)
    if not inspect.isclass(optimizer) or not callable(getattr(optimizer, "trigger_refresh", None)):
        missing.append("bentoml marshal.dispatcher.Optimizer.trigger_refresh")
    elif "self.wait = " not in inspect.getsource(optimizer):
        missing.append("bentoml dispatcher Optimizer.wait (the learned wait)")
    from bentoml import serving
    from bentoml._internal.context import server_context

    if not hasattr(server_context, "worker_index"):
        missing.append("bentoml server_context.worker_index")
    if not callable(getattr(serving, "running_inside_container", None)):
        missing.append("bentoml serving.running_inside_container")
    return missing


def _missing_http_internals() -> list[str]:
    """What section 4 (metrics labels, guarded h11 protocol, log filter) relies upon and is not there."""
    import uvicorn.config
    from _bentoml_impl.server import app as bentoml_app
    from bentoml._internal.server import http_app
    from bentoml._internal.server.http import instruments
    from uvicorn.protocols.http import auto, h11_impl

    missing = []
    metrics = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if inspect.isclass(metrics):  # BentoML's own class, when RouteLabelledMetrics is installed
        metrics = next(c for c in metrics.__mro__ if not getattr(c, "route_labelled", False))
    if not inspect.isclass(metrics) or _parameters(metrics.__call__) != ("self", "scope", "receive", "send"):
        missing.append("bentoml instruments.RunnerTrafficMetricsMiddleware class with __call__(scope, receive, send)")
    elif "app" not in inspect.signature(metrics.__init__).parameters:
        missing.append("bentoml RunnerTrafficMetricsMiddleware(app, ...)")
    else:
        setup = inspect.getsource(metrics._setup)
        for name in METRICS_SETUP_ATTRIBUTES:
            if f"self.{name} = " not in setup:
                missing.append(f"bentoml RunnerTrafficMetricsMiddleware._setup setting {name}")
    if "from bentoml._internal.server.http.instruments import" not in inspect.getsource(bentoml_app):
        missing.append("bentoml ServiceAppFactory importing RunnerTrafficMetricsMiddleware when it builds the app")
    if not hasattr(auto, "AutoHTTPProtocol") or uvicorn.config.HTTP_PROTOCOLS.get("auto") != (
        "uvicorn.protocols.http.auto:AutoHTTPProtocol"
    ):
        missing.append("uvicorn protocols.http.auto.AutoHTTPProtocol as the 'auto' HTTP protocol")
    for method in GUARDED_H11_METHODS:
        if not callable(getattr(h11_impl.H11Protocol, method, None)):
            missing.append(f"uvicorn H11Protocol.{method}")
    handle_events = inspect.getsource(h11_impl.H11Protocol.handle_events)
    if "except h11.RemoteProtocolError" not in handle_events or "self.send_400_response(" not in handle_events:
        missing.append("uvicorn H11Protocol.handle_events calling send_400_response on h11.RemoteProtocolError")
    if not isinstance(getattr(h11.Connection, "their_state", None), property):
        missing.append("h11 Connection.their_state")
    if http_app.logger.name != BENTOML_HTTP_APP_LOGGER or "exc_info" not in inspect.getsource(http_app.log_exception):
        missing.append(f"bentoml logger {BENTOML_HTTP_APP_LOGGER!r} logging exceptions with exc_info")
    return missing


def _parameters(function: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def check_compatibility(installed: Mapping[str, str] | None = None) -> None:
    """Warn when bentoml/uvicorn differ from `TESTED_VERSIONS` in major.minor; raise when what is relied
    upon is gone."""
    installed = dict(installed or installed_versions())
    untested = {
        package: version for package, version in installed.items() if major_minor(version) != TESTED_VERSIONS[package]
    }
    if not untested:
        return
    tested = ", ".join(f"{package} {version}.x" for package, version in TESTED_VERSIONS.items())
    found = ", ".join(f"{package} {version}" for package, version in untested.items())
    missing = missing_internals()
    if missing:
        raise IncompatibleInternals(
            f"service/bentoml_compat.py was written for {tested}; with {found} these are missing: "
            f"{'; '.join(missing)}. Pin the tested versions or update service/bentoml_compat.py."
        )
    logger.warning(
        "service/bentoml_compat.py was tested with %s, not %s; the internals it relies on are present "
        "(run tests/test_bentoml_compat.py to confirm they still behave the same)",
        tested,
        found,
    )


# --- 1. IO descriptors that parse requests themselves ------------------------------------------------------------


class RequestParsingInput(IODescriptor):
    """An input descriptor that reads the HTTP request with `parse_request` instead of BentoML's serde, and
    documents `wire_model` (with `file_fields` as multipart file fields) on the OpenAPI page."""

    wire_model: ClassVar[type[BaseModel]]
    file_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.multipart_fields = list(cls.file_fields)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return cls.wire_model.model_json_schema(*args, **kwargs)

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "RequestParsingInput":
        return await cls.parse_request(request)

    @classmethod
    async def parse_request(cls, request: Request) -> "RequestParsingInput":
        raise NotImplementedError


class MergingOutput(IODescriptor):
    """Output descriptor of a batchable API whose items are one-image answers: BentoML hands each request its
    share of the batch's list, and `merge` (of the response model mixed in) makes it one answer."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:
        if isinstance(obj, Sequence):
            obj = cls.merge(obj)  # type: ignore[attr-defined]
        return await super().to_http_response(obj, serde)


# --- 2. client-error bodies --------------------------------------------------------------------------------------


def error_message(body: Any) -> str | None:
    """The one-line message of a BentoML client-error body, or None when the body is not one."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None
    detail = body.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) and "msg" in d for d in detail):
        return describe_validation_errors(detail)  # pydantic's, serialised by BentoML
    return capped(body["error"])


class JSONErrorBody:
    """ASGI middleware: every 4xx JSON response leaves as `{"error": "..."}` (other responses pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held_start: Message | None = None
        chunks: list[bytes] = []

        async def send_normalized(message: Message) -> None:
            nonlocal held_start
            if message["type"] == "http.response.start" and _is_json_client_error(message):
                held_start = message
                return
            if held_start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _normalized_body(b"".join(chunks))
            headers = [(k, v) for k, v in held_start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held_start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, send_normalized)


def _is_json_client_error(start: Message) -> bool:
    if not 400 <= start["status"] < 500:
        return False
    content_type = dict((k.lower(), v) for k, v in start.get("headers", [])).get(b"content-type", b"")
    return content_type.split(b";")[0].strip() == b"application/json"


def _normalized_body(raw: bytes) -> bytes:
    try:
        message = error_message(json.loads(raw))
    except ValueError:
        return raw
    return raw if message is None else json.dumps({"error": message}).encode()


# --- 3. graceful shutdown that refuses new connections -----------------------------------------------------------


def stop_listening(servers: Iterable[Any]) -> None:
    """Shut down (not just close) the listening sockets of uvicorn's asyncio servers.

    The listening socket belongs to BentoML's process manager (circus), which keeps it open until every
    worker has exited, so closing the worker's copy leaves new connections queued by the kernel, unanswered.
    `shutdown(2)` acts on the socket itself, not on this process's descriptor: the kernel refuses them."""
    for server in servers:
        for listener in getattr(server, "sockets", None) or ():
            try:
                duplicate = socket.socket(fileno=os.dup(listener.fileno()))
            except OSError:
                continue
            with duplicate:
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                except OSError:  # already shut, or not a listening TCP socket
                    pass


def refuse_new_connections_on_shutdown(before_shutdown: Callable[[], None]) -> None:
    """Make this worker's shutdown start with `before_shutdown()` (e.g. mark the service not ready), then shut
    the listening sockets down (`stop_listening`), then run uvicorn's own drain of in-flight requests.

    Wraps `uvicorn.Server.shutdown` once per process; a later call adds its `before_shutdown` to the list."""
    import uvicorn

    installed = uvicorn.Server.shutdown
    callbacks: list[Callable[[], None]] | None = getattr(installed, "_before_shutdown", None)
    if callbacks is not None:
        callbacks.append(before_shutdown)
        return
    callbacks = [before_shutdown]

    @functools.wraps(installed)
    async def shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        for callback in callbacks:
            callback()
        stop_listening(getattr(self, "servers", ()))
        logger.info("shutting down: not ready, refusing new connections, finishing in-flight requests")
        await installed(self, *args, **kwargs)

    shutdown._before_shutdown = callbacks  # type: ignore[attr-defined]
    uvicorn.Server.shutdown = shutdown  # type: ignore[method-assign]


def install_in_worker(before_shutdown: Callable[[], None]) -> None:
    """What the service's startup hook runs in each worker: the version guard, the shutdown wrapper and the
    one-line logging of client errors."""
    check_compatibility()
    refuse_new_connections_on_shutdown(before_shutdown)
    log_client_errors_in_one_line()


# --- 4. HTTP hardening -------------------------------------------------------------------------------------------

UNMATCHED_ROUTE_LABEL = "<unmatched>"
"""The `endpoint` label of every request (HTTP or WebSocket) whose path no route of the app matches."""

BENTOML_HTTP_APP_LOGGER = "bentoml._internal.server.http_app"
"""The logger of BentoML's `log_exception` ("Exception on PATH [METHOD]"), called for every error an API raises."""

GUARDED_H11_METHODS = (
    "connection_made",
    "data_received",
    "on_response_complete",
    "send_400_response",
    "connection_lost",
    "pause_writing",
    "resume_writing",
)
"""The uvicorn `H11Protocol` methods `GuardedH11Protocol` overrides."""

METRICS_SETUP_ATTRIBUTES = (
    "metrics_request_total",
    "metrics_request_duration",
    "metrics_request_in_progress",
    "metrics_last_request_timestamp",
)
"""The metrics BentoML's middleware creates in `_setup`, whose `<unmatched>` series `RouteLabelledMetrics` creates."""

LINGER_S = 2.0
"""After answering a parser error: how long to keep reading (and discarding) before closing, so that the client
reads the answer instead of a reset."""


def route_label(scope: Scope) -> str | None:
    """The path of the first route of the Starlette app handling `scope` that matches it (a Mount gives its
    prefix, a wrong method still its route), else `UNMATCHED_ROUTE_LABEL`; None when `scope` has no app."""
    router = getattr(scope.get("app"), "router", None)
    if router is None:
        return None
    for route in router.routes:
        if route.matches(scope)[0] is not Match.NONE:
            return getattr(route, "path", None) or UNMATCHED_ROUTE_LABEL
    return UNMATCHED_ROUTE_LABEL


def _route_labelled_metrics() -> type:
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "route_labelled", False):
        return base

    class RouteLabelledMetrics(base):  # type: ignore[valid-type, misc]
        """BentoML's request metrics with `endpoint` = the matched route's path or `<unmatched>`: BentoML labels
        them with `scope["path"]`, so every unknown path a client sends (a 404) would add series to /metrics
        and to the multiprocess metric files, without bound. The app inside still gets the original scope."""

        route_labelled = True

        def __init__(self, app: ASGIApp, *args: Any, **kwargs: Any) -> None:
            super().__init__(_OriginalScope(app), *args, **kwargs)

        def _setup(self, *args: Any, **kwargs: Any) -> None:
            """BentoML's setup (on the first request), then the series of unmatched requests, created empty
            as BentoML creates those of its routes: an unknown path adds no series to /metrics, not even once."""
            super()._setup(*args, **kwargs)
            from bentoml._internal.context import server_context

            constant = dict(
                service_name=server_context.bento_name,
                service_version=server_context.bento_version,
                runner_name=server_context.service_name,
            )
            unmatched = dict(endpoint=UNMATCHED_ROUTE_LABEL, **constant)
            self.metrics_request_total.labels(http_response_code=404, **unmatched)
            self.metrics_request_duration.labels(http_response_code=404, **unmatched)
            self.metrics_request_in_progress.labels(**unmatched)
            self.metrics_last_request_timestamp.labels(**constant)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket"):
                label = route_label(scope)
                if label is not None and label != scope["path"]:
                    scope = {**scope, "path": label, _ORIGINAL_SCOPE: scope}
            await super().__call__(scope, receive, send)

    return RouteLabelledMetrics


_ORIGINAL_SCOPE = "transfer_serve.original_scope"


class _OriginalScope:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope.get(_ORIGINAL_SCOPE, scope), receive, send)


def install_route_labelled_metrics() -> type:
    """Make BentoML build its apps with `RouteLabelledMetrics` (it imports the middleware class when it builds
    an app, so this must run before). Idempotent; returns the class installed."""
    from bentoml._internal.server.http import instruments

    instruments.RunnerTrafficMetricsMiddleware = _route_labelled_metrics()
    return instruments.RunnerTrafficMetricsMiddleware


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402  (section 4 only)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus:

    - the request head must be complete `header_timeout_s` after the connection opens, or after the first byte
      that follows a response (the rest of a body the app answered without reading counts too); else the
      connection is closed. Idle keep-alive stays uvicorn's (`timeout_keep_alive`, 5 s), and a request being
      served is not timed here (its body is `RequestGuard`'s);
    - a request h11 cannot parse is answered with h11's status hint (431 for a head over 16 KiB, 501 for an
      unknown Transfer-Encoding, else 400) as `{"error": ...}` with `Connection: close`; then the connection
      is closed lingeringly (EOF sent, input read and discarded for `LINGER_S`), so that a client still sending
      reads the answer instead of a reset. uvicorn answers 400 whatever the error and closes at once.

    - a response the client does not read must drain: once the transport's write buffer is over its high-water
      mark (asyncio calls `pause_writing`; uvicorn then blocks the app's send), it must fall below it again
      (`resume_writing`) within `send_timeout_s`, else the connection is aborted, its buffer dropped. uvicorn
      waits forever, so 30 clients that never read held their answers (1.2 GB) as long as they liked.

    Installing it as uvicorn's "auto" protocol also pins the parser to h11 (httptools, if it were installed,
    would otherwise be picked, and it sets no header-size limit at all)."""

    header_timeout_s: float = 60.0
    send_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: Any = None
        self._send_timer: Any = None
        self._draining = False

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._on_send_timeout)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        self.logger.debug("aborting a connection: the client read nothing for %g s", self.send_timeout_s)
        self.transport.abort()

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self._serving() or self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        self.logger.debug("closing a connection: no complete request head within %g s", self.header_timeout_s)
        self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        super().data_received(data)
        if self._draining:
            return
        if self._serving() or self.transport.get_protocol() is not self:  # a request (or a WebSocket) took over
            self._cancel_head_timer()
        elif not self.transport.is_closing():
            self._arm_head_timer()  # the first byte after a response: the next head (or an unread body) is timed

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._serving():  # a pipelined request started
            self._cancel_head_timer()

    def send_400_response(self, msg: str) -> None:
        error = sys.exc_info()[1]  # uvicorn calls this inside `except h11.RemoteProtocolError`
        status = getattr(error, "error_status_hint", 400) if isinstance(error, h11.RemoteProtocolError) else 400
        status = status if isinstance(status, int) and 400 <= status < 600 else 400
        message = "request header fields too large" if status == 431 else f"invalid HTTP request: {error or msg}"
        body = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        self._cancel_head_timer()
        self._draining = True
        try:
            response = h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode())
            self.transport.write(self.conn.send(response))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response was already under way: just close
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


def install_guarded_protocol(
    header_timeout_s: float, send_timeout_s: float = GuardedH11Protocol.send_timeout_s
) -> type:
    """Make uvicorn's "auto" HTTP protocol `GuardedH11Protocol`: `uvicorn.Config.load()` resolves the alias
    when the worker's server starts, so this must run before."""
    from uvicorn.protocols.http import auto

    GuardedH11Protocol.header_timeout_s = header_timeout_s
    GuardedH11Protocol.send_timeout_s = send_timeout_s
    auto.AutoHTTPProtocol = GuardedH11Protocol
    return GuardedH11Protocol


def install_http_guards(header_timeout_s: float, send_timeout_s: float = GuardedH11Protocol.send_timeout_s) -> None:
    """Run when the service module is imported (see the module docstring for why not from a hook)."""
    install_route_labelled_metrics()
    install_guarded_protocol(header_timeout_s, send_timeout_s)


class ClientErrorsOneLine(logging.Filter):
    """BentoML logs every exception an API raises at ERROR with its traceback, a client error included. For a
    4xx `BentoMLException` or a pydantic `ValidationError` (BentoML answers 400), this makes the record one
    WARNING line naming the status and the error; other records (5xx) pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BentoMLException):
            status = int(error.error_code)
        elif isinstance(error, ValidationError):
            status = 400
        else:
            return True
        if status >= 500:
            return True
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        record.msg = capped("%s -> %d %s" % (record.getMessage(), status, first_line))  # bounded, like the answer
        record.args = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


_CLIENT_ERRORS_ONE_LINE = ClientErrorsOneLine()


def log_client_errors_in_one_line() -> None:
    """Install `ClientErrorsOneLine` on BentoML's http_app logger (once per process)."""
    logging.getLogger(BENTOML_HTTP_APP_LOGGER).addFilter(_CLIENT_ERRORS_ONE_LINE)

# --- 5. adaptive batching: a bound on the learned wait ----------------------------------------------------

def bound_batch_wait(seconds: float) -> None:
    """Cap `Optimizer.wait` of every adaptive-batching dispatcher in this process at `seconds` (patched once;
    a later call changes the bound)."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    Optimizer.max_learned_wait_s = max(0.0, float(seconds))  # read by the wrapper at each refresh
    original = Optimizer.trigger_refresh
    if getattr(original, "_bounds_wait", False):
        return

    @functools.wraps(original)
    def trigger_refresh(self: Any) -> None:
        original(self)
        bound = getattr(self, "max_learned_wait_s", None)
        if bound is not None and self.wait > bound:
            logger.debug("adaptive batching: learned wait %.1f ms capped at %.1f ms", self.wait * 1e3, bound * 1e3)
            self.wait = bound

    trigger_refresh._bounds_wait = True  # type: ignore[attr-defined]
    Optimizer.trigger_refresh = trigger_refresh  # type: ignore[method-assign]
