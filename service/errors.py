"""Client errors and their HTTP form: a 4xx status with the JSON body `{"error": "<what is wrong>"}`.

Request parsing raises the `RequestError` subclasses below; BentoML turns a `BentoMLException` into a
response with its `error_code`. BentoML 1.4 writes that body, and its own validation errors, in shapes of
its own; `service.bentoml_compat.JSONErrorBody` rewrites them into the documented object so every client
error reads the same.
"""

from __future__ import annotations

from http import HTTPStatus
from itertools import islice
from typing import Any, Iterable, Mapping

from bentoml.exceptions import BentoMLException

MAX_ERROR_CHARS = 1000
"""An error message (answer body and log line) quotes at most this many characters of the request: a 400 that
echoed each of 100,000 unknown keys was 21.9 MB, written again to the log."""
MAX_NAMED_ERRORS = 5
"""Validation errors named one by one; the rest are counted."""
MAX_QUOTED_NAME_CHARS = 64
"""Characters of one client-chosen field name quoted in a message."""


def capped(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class RequestError(BentoMLException):
    """The request is malformed: a missing or wrong field, bad JSON, bad base64. The message is `capped`."""

    error_code = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(capped(message), **kwargs)


class PayloadTooLarge(RequestError):
    """The body is over the byte limit, or it carries more images than one request may."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMediaType(RequestError):
    """The body is neither multipart/form-data nor JSON."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class UnprocessableImage(RequestError):
    """An uploaded file is not an image this service can decode (or is over the pixel limit)."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class RequestTimeout(RequestError):
    """The request body did not arrive in time (`TRANSFER_SERVE_BODY_TIMEOUT_S`)."""

    error_code = HTTPStatus.REQUEST_TIMEOUT


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic error details as one line naming the first `MAX_NAMED_ERRORS` fields and what is wrong with
    each (names cut to `MAX_QUOTED_NAME_CHARS`), then how many more there are."""

    def describe(error: Mapping[str, Any]) -> str:
        field = capped(".".join(str(part) for part in error.get("loc", ())) or "body", MAX_QUOTED_NAME_CHARS)
        if error.get("type") == "extra_forbidden":
            return f"unknown field {field!r}"
        return f"{field}: {capped(str(error['msg']), MAX_QUOTED_NAME_CHARS * 4)}"

    errors = iter(errors)
    named = [describe(error) for error in islice(errors, MAX_NAMED_ERRORS)]
    more = sum(1 for _ in errors)
    return "; ".join(named) + (f"; and {more} more errors" if more else "")


class ModelOutputError(BentoMLException):
    """The model answered NaN or infinity for a batch: a 500 naming it, never a 200 with null probabilities."""

    error_code = HTTPStatus.INTERNAL_SERVER_ERROR
