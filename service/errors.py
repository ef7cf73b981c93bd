"""Client errors and their HTTP form: a 4xx status with the JSON body `{"error": "<what is wrong>"}`.

Request parsing raises the `RequestError` subclasses below; BentoML turns a `BentoMLException` into a
response with its `error_code`. BentoML 1.4 writes 4xx bodies as a one-element JSON array
(`[{"error": ...}]`, bentoml/BentoML#4232) and its own validation errors as
`{"error": "1 validation error for Input", "detail": [...]}`; `JSONErrorBody` rewrites both into the
documented object so every client error reads the same.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Iterable, Mapping

from bentoml.exceptions import BentoMLException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestError(BentoMLException):
    """The request is malformed: a missing or wrong field, bad JSON, bad base64."""

    error_code = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(RequestError):
    """The body is over the byte limit, or it carries more images than one request may."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(RequestError):
    """The body is neither multipart/form-data nor JSON."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class UnprocessableImage(RequestError):
    """An uploaded file is not an image this service can decode (or is over the pixel limit)."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


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


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic error details as one line naming each field and what is wrong with it."""

    def describe(error: Mapping[str, Any]) -> str:
        field = ".".join(str(part) for part in error.get("loc", ())) or "body"
        if error.get("type") == "extra_forbidden":
            return f"unknown field {field!r}"
        return f"{field}: {error['msg']}"

    return "; ".join(describe(error) for error in errors)


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
