"""Client errors and their HTTP form: a 4xx status with the JSON body `{"error": "<what is wrong>"}`.

Request parsing raises the `RequestError` subclasses below; BentoML turns a `BentoMLException` into a
response with its `error_code`. BentoML 1.4 writes that body, and its own validation errors, in shapes of
its own; `service.bentoml_compat.JSONErrorBody` rewrites them into the documented object so every client
error reads the same.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Iterable, Mapping

from bentoml.exceptions import BentoMLException


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


class RequestTimeout(RequestError):
    """The request body did not arrive in time (`TRANSFER_SERVE_BODY_TIMEOUT_S`)."""

    error_code = HTTPStatus.REQUEST_TIMEOUT


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic error details as one line naming each field and what is wrong with it."""

    def describe(error: Mapping[str, Any]) -> str:
        field = ".".join(str(part) for part in error.get("loc", ())) or "body"
        if error.get("type") == "extra_forbidden":
            return f"unknown field {field!r}"
        return f"{field}: {error['msg']}"

    return "; ".join(describe(error) for error in errors)


class ModelOutputError(BentoMLException):
    """The model answered NaN or infinity for a batch: a 500 naming it, never a 200 with null probabilities."""

    error_code = HTTPStatus.INTERNAL_SERVER_ERROR
