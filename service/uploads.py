"""Image requests in, decoded RGB images out, or a `RequestError` naming what is wrong.

A request is either multipart/form-data (image files repeated under `images`, options as text fields) or
JSON (`{"images": [base64, ...], ...options}`). Everything a client can get wrong is found here, before
any image joins a batch: the body size, the content type, missing or unknown fields, option values, the
image count, undecodable or oversized images. No URL is fetched unless `UploadLimits.allow_url_fetch`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Generic, Iterator, Sequence, TypeVar

import anyio
import anyio.to_thread
import httpx
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from models.decode_limits import DEFAULT_MAX_DECODE_CPU_S
from models.decoding import ImageDecodeError, OpenedImage, default_decode_bytes, open_image
from models.memory import trim_after
from models.preprocessing import Preprocessing
from service.errors import (
    PayloadTooLarge,
    RequestError,
    UnprocessableImage,
    UnsupportedMediaType,
    describe_validation_errors,
)

IMAGES_FIELD = "images"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_TEXT_FIELDS = 64
MAX_JSON_OPTION_VALUES = 64
"""JSON values (keys, numbers, strings, lists, objects) a JSON body may hold besides its images."""
DISCONNECT_POLL_S = 0.25
"""How often a request whose images are being decoded checks that its client is still there."""

Options = TypeVar("Options", bound=BaseModel)


@dataclass(frozen=True)
class UploadLimits:
    """What one request may contain and cost. `decode_slots` is shared by every request of a process: at most
    that many images are decoded at once, whatever the number of concurrent requests."""

    max_images: int
    max_pixels: int
    max_body_bytes: int
    allow_url_fetch: bool = False
    url_fetch_timeout_s: float = 10.0
    max_request_decode_bytes: int = 1024 * 1024 * 1024
    max_decode_cpu_s: float = DEFAULT_MAX_DECODE_CPU_S
    decode_slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))
    preprocessing: Preprocessing | None = None


@dataclass(frozen=True)
class ImageSource:
    """One entry of the `images` field before decoding: file bytes, or a URL to fetch."""

    name: str  # how error messages refer to it, e.g. "images[2] ('scan.jpg')"
    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class ImageRequest(Generic[Options]):
    images: list[Image.Image]
    options: Options


async def read_image_request(
    request: Request, options_model: type[Options], limits: UploadLimits
) -> ImageRequest[Options]:
    """Parse, check and decode one /classify or /embed request."""
    body = await read_body(request, limits.max_body_bytes)
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type in FORM_TYPES:
        sources, text_fields = await parse_form(request.headers, body, limits)
        fields = form_field_values(text_fields)
    elif media_type == "application/json":
        check_json_size(body, limits.max_images)  # before json.loads: what it builds is bounded by these counts
        sources, fields = await anyio.to_thread.run_sync(parse_json, body)  # off the event loop
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {media_type!r}: send multipart/form-data with image files under "
            f"'{IMAGES_FIELD}', or application/json with base64 images under '{IMAGES_FIELD}'"
        )
    options = validate_options(options_model, fields)
    check_image_count(len(sources), limits.max_images)
    blobs = [await resolve_source(source, limits) for source in sources]
    images = await decode_while_connected(request, blobs, limits)
    return ImageRequest(images=images, options=options)


async def decode_while_connected(
    request: Request, blobs: Sequence[tuple[str, bytes]], limits: UploadLimits
) -> list[Image.Image]:
    """`decode_images` in a worker thread, stopped (at its next read) when this request is cancelled (BentoML's
    request timeout) or its client disconnects: the thread's work would serve nobody."""
    cancelled = threading.Event()
    async with anyio.create_task_group() as tasks:

        async def watch_client() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            cancelled.set()

        tasks.start_soon(watch_client)
        try:
            outcome: list[Image.Image] | Exception = await anyio.to_thread.run_sync(
                decode_images, blobs, limits, cancelled, abandon_on_cancel=True
            )
        except Exception as exc:  # raised below, outside the task group (which would wrap it in a group)
            outcome = exc
        finally:
            cancelled.set()
            tasks.cancel_scope.cancel()
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is {int(declared)} bytes, over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(headers: Headers, body: bytes, limits: UploadLimits) -> tuple[list[ImageSource], dict[str, str]]:
    """multipart/form-data (or a url-encoded form, which can only carry URLs) into image sources and text fields."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    if headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded"):
        parser: FormParser | MultiPartParser = FormParser(headers, stream())
    else:
        parser = MultiPartParser(headers, stream(), max_files=limits.max_images + 1, max_fields=MAX_TEXT_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if str(exc).startswith("Too many files"):
            raise PayloadTooLarge(too_many_images(limits.max_images)) from None
        raise RequestError(f"malformed multipart body: {exc}") from None
    try:
        sources: list[ImageSource] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if key == IMAGES_FIELD:
                sources.append(await _multipart_source(len(sources), value))
            elif isinstance(value, UploadFile):
                raise RequestError(f"field {key!r} must be a text field, not a file (images go under {IMAGES_FIELD!r})")
            elif key in fields:
                raise RequestError(f"field {key!r} is given more than once")
            else:
                fields[key] = value
    finally:
        await form.close()
    if not sources:
        raise RequestError(f"missing field '{IMAGES_FIELD}': upload one or more image files under '{IMAGES_FIELD}'")
    return sources, fields


async def _multipart_source(index: int, value: UploadFile | str) -> ImageSource:
    if isinstance(value, UploadFile):
        name = f"{IMAGES_FIELD}[{index}] ({value.filename!r})" if value.filename else f"{IMAGES_FIELD}[{index}]"
        return ImageSource(name=name, data=await value.read())
    name = f"{IMAGES_FIELD}[{index}]"
    if _is_url(value):
        return ImageSource(name=name, url=value.strip())
    raise RequestError(f"{name} must be an uploaded file, not a text field")


def check_json_size(body: bytes, max_images: int) -> None:
    """Refuse a JSON body holding more values than its images and options need, from byte counts alone (no
    parse): every value after the first follows a ',' and every key precedes a ':'; base64 holds neither, a data:
    URI one of each (so 3 per image). A 33 MB body of options-only keys made json.loads build 800 MB of objects."""
    allowed = 3 * max_images + MAX_JSON_OPTION_VALUES
    separators = body.count(b",") + body.count(b":")
    if separators > allowed:
        raise PayloadTooLarge(
            f"JSON body holds about {separators} values, over the limit of {allowed} for {max_images} images and "
            f"their options ({MAX_JSON_OPTION_VALUES} option values)"
        )


def parse_json(body: bytes) -> tuple[list[ImageSource], dict[str, object]]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError as exc:
        raise RequestError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("body is not acceptable JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(f"JSON body must be an object with an '{IMAGES_FIELD}' list")
    if IMAGES_FIELD not in payload:
        raise RequestError(f"missing field '{IMAGES_FIELD}': give a list of base64-encoded images")
    entries = payload.pop(IMAGES_FIELD)
    if not isinstance(entries, list) or not entries:
        raise RequestError(f"field '{IMAGES_FIELD}' must be a non-empty list of base64-encoded images")
    return [_json_source(i, entry) for i, entry in enumerate(entries)], payload


def _json_source(index: int, entry: object) -> ImageSource:
    name = f"{IMAGES_FIELD}[{index}]"
    if not isinstance(entry, str):
        raise RequestError(f"{name} must be a base64 string, not {type(entry).__name__}")
    if _is_url(entry):
        return ImageSource(name=name, url=entry.strip())
    text = entry.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{name}: only base64 data: URIs are accepted")
    try:
        return ImageSource(name=name, data=base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{name} is not valid base64: {exc}") from None


def _is_url(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


def form_field_values(fields: dict[str, str]) -> dict[str, object]:
    """Text form fields as typed values: a JSON number or `true`/`false` (any case) is read as such; anything
    else stays text, so strict validation names the field ("yes" is no boolean, "2.5" no count)."""
    values: dict[str, object] = {}
    for key, text in fields.items():
        literal = text.strip().lower() if text.strip().lower() in ("true", "false") else text.strip()
        try:
            value = json.loads(literal)
        except ValueError:
            value = text
        values[key] = value if isinstance(value, (bool, int, float)) else text
    return values


def validate_options(options_model: type[Options], fields: dict[str, object]) -> Options:
    """Strict: `top_k: true` or `normalize: "yes"` are refused, not coerced."""
    try:
        return options_model.model_validate(fields, strict=True)
    except ValidationError as exc:
        raise RequestError(describe_validation_errors(exc.errors())) from None


def too_many_images(limit: int) -> str:
    return f"too many images in one request: the limit is {limit}"


def check_image_count(count: int, limit: int) -> None:
    if count > limit:
        raise PayloadTooLarge(f"{too_many_images(limit)}, this request has {count}")


async def resolve_source(source: ImageSource, limits: UploadLimits) -> tuple[str, bytes]:
    if source.url is None:
        return source.name, source.data or b""
    if not limits.allow_url_fetch:
        raise RequestError(
            f"{source.name}: this server does not fetch image URLs (the operator has not enabled it); "
            "upload the image itself"
        )
    return source.name, await fetch_url(source.name, source.url, limits)


async def fetch_url(name: str, url: str, limits: UploadLimits) -> bytes:
    """Download an image for a client; only ever called when the operator enabled URL fetching."""
    try:
        async with httpx.AsyncClient(timeout=limits.url_fetch_timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise UnprocessableImage(f"{name}: fetching {url} answered HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_body_bytes:
                        raise PayloadTooLarge(f"{name}: {url} is over the limit of {limits.max_body_bytes} bytes")
                return bytes(data)
    except httpx.HTTPError as exc:
        raise UnprocessableImage(f"{name}: could not fetch {url}: {exc}") from None


def decode_images(
    blobs: Sequence[tuple[str, bytes]], limits: UploadLimits, cancelled: threading.Event | None = None
) -> list[Image.Image]:
    """Decode a request's images one at a time, each straight to the size the model needs (the served model's
    decode path) and only while holding one of the process's decode slots, after checking from the headers
    (each parsed once) that what their decodes hold fits the per-image and per-request budgets. Every upload
    is decoded fully, so a truncated file fails here, not in the batch; the error names the bad one. `cancelled`
    stops the work at its next read."""
    total = 0
    with contextlib.ExitStack() as stack:
        opened: list[OpenedImage] = []
        for name, data in blobs:
            with _named(name):
                image = stack.enter_context(
                    open_image(data, limits.max_pixels, preprocessing=limits.preprocessing,
                               max_cpu_s=limits.max_decode_cpu_s, cancelled=cancelled)
                )
                image.check_bytes(default_decode_bytes(limits.max_pixels))
                opened.append(image)
        total = sum(image.plan.peak_bytes for image in opened)
        if total > limits.max_request_decode_bytes:
            raise PayloadTooLarge(
                f"the request's images would take {total} bytes decoded, over the per-request limit of "
                f"{limits.max_request_decode_bytes} (max_request_decode_bytes); send fewer or smaller images"
            )
        images = []
        try:
            for (name, _), image in zip(blobs, opened):
                with _named(name), limits.decode_slots:
                    images.append(image.decode())
        finally:
            trim_after(total)  # the full-size pixels are freed by now: give their pages back to the OS
        return images


@contextlib.contextmanager
def _named(name: str) -> Iterator[None]:
    """An ImageDecodeError as the 422 naming the upload it is about."""
    try:
        yield
    except ImageDecodeError as exc:
        raise UnprocessableImage(f"{name}: {exc}") from None
