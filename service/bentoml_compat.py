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
from importlib import metadata
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from bentoml import IODescriptor
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import describe_validation_errors

logger = logging.getLogger("bentoml.transfer_serve")

TESTED_VERSIONS: dict[str, str] = {"bentoml": "1.4", "uvicorn": "0.54"}
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
    return missing


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
    return body["error"]


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
    """What the service's startup hook runs in each worker: the version guard, then the shutdown wrapper."""
    check_compatibility()
    refuse_new_connections_on_shutdown(before_shutdown)
