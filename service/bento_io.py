"""BentoML IO descriptors that let /classify and /embed be batchable and still reject bad input early.

A batchable BentoML API takes a single list argument; BentoML concatenates the lists of the requests that
share a batch and hands each request back its slice of the returned list. Here every list item is one
decoded image plus its request's options (`ClassifyItem`, `EmbedItem`), and every returned item is a
one-image response that `BatchShares` merges back into the request's response.

`ImageBatchInput.from_http_request` replaces BentoML's body parsing with `service.uploads`, so body
limits, field checks and image decoding happen per request, before the request is queued for a batch:
a bad image is answered with its own 4xx and never reaches the forward pass that serves other requests.
It also means BentoML's own fetching of URLs given in place of files never runs. The OpenAPI page shows
the documented multipart body (`wire_model`), not the internal batch items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from bentoml import IODescriptor
from PIL import Image
from pydantic import BaseModel, ConfigDict, SkipValidation
from starlette.requests import Request
from starlette.responses import Response

from service.schemas import (
    ClassifyForm,
    ClassifyOptions,
    ClassifyResponse,
    EmbedForm,
    EmbedOptions,
    EmbedResponse,
)
from service.uploads import IMAGES_FIELD, ImageRequest, UploadLimits, read_image_request


@dataclass(frozen=True)
class ClassifyItem:
    image: Image.Image
    top_k: int


@dataclass(frozen=True)
class EmbedItem:
    image: Image.Image
    normalize: bool


class ImageBatchInput(IODescriptor):
    """One request's images as batch items; subclasses say which options and items. Bind limits with `with_limits`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    limits: ClassVar[UploadLimits]
    options_model: ClassVar[type[BaseModel]]
    wire_model: ClassVar[type[BaseModel]]

    @classmethod
    def with_limits(cls, limits: UploadLimits) -> type["ImageBatchInput"]:
        return type(cls.__name__, (cls,), {"limits": limits, "__module__": cls.__module__})

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.multipart_fields = [IMAGES_FIELD]  # documented as multipart/form-data

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return cls.wire_model.model_json_schema(*args, **kwargs)

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> "ImageBatchInput":
        return cls.from_image_request(await read_image_request(request, cls.options_model, cls.limits))

    @classmethod
    def from_image_request(cls, request: ImageRequest[Any]) -> "ImageBatchInput":
        raise NotImplementedError


class ClassifyInput(ImageBatchInput):
    options_model = ClassifyOptions
    wire_model = ClassifyForm

    images: SkipValidation[list[ClassifyItem]]

    @classmethod
    def from_image_request(cls, request: ImageRequest[ClassifyOptions]) -> "ClassifyInput":
        return cls(images=[ClassifyItem(image, request.options.top_k) for image in request.images])


class EmbedInput(ImageBatchInput):
    options_model = EmbedOptions
    wire_model = EmbedForm

    images: SkipValidation[list[EmbedItem]]

    @classmethod
    def from_image_request(cls, request: ImageRequest[EmbedOptions]) -> "EmbedInput":
        return cls(images=[EmbedItem(image, request.options.normalize) for image in request.images])


class BatchShares(IODescriptor):
    """Output descriptor base: the batched method returns one-image responses; merge one request's share."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:
        if isinstance(obj, Sequence):
            obj = cls.merge(obj)  # type: ignore[attr-defined]
        return await super().to_http_response(obj, serde)


class ClassifyOutput(BatchShares, ClassifyResponse):
    pass


class EmbedOutput(BatchShares, EmbedResponse):
    pass
