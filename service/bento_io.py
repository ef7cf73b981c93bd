"""BentoML IO descriptors that let /classify and /embed be batchable and still reject bad input early.

A batchable BentoML API takes a single list argument; BentoML concatenates the lists of the requests that
share a batch and hands each request back its slice of the returned list. Here every list item is one
decoded image plus its request's options (`ClassifyItem`, `EmbedItem`), and every returned item is a
one-image response that `MergingOutput` merges back into the request's response.

`ImageBatchInput.parse_request` replaces BentoML's body parsing with `service.uploads`, so body limits,
field checks and image decoding happen per request, before the request is queued for a batch: a bad image
is answered with its own 4xx and never reaches the forward pass that serves other requests. It also means
BentoML's own fetching of URLs given in place of files never runs. The OpenAPI page shows the documented
multipart body (`wire_model`), not the internal batch items. The BentoML hooks this takes are overridden
in one place, `service.bentoml_compat` (`RequestParsingInput`, `MergingOutput`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Self, Sequence

from PIL import Image
from pydantic import BaseModel, ConfigDict, SkipValidation
from starlette.requests import Request

from service.bentoml_compat import MergingOutput, RequestParsingInput
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
    unknown_label: bool | None = None  # None: the server's setting (TRANSFER_SERVE_UNKNOWN_AS_LABEL)


@dataclass(frozen=True)
class EmbedItem:
    image: Image.Image
    normalize: bool


@contextlib.contextmanager
def released_after(items: Sequence[ClassifyItem | EmbedItem]) -> Iterator[None]:
    """Free the batch's decoded pixels once its forward pass is done (or failed): BentoML's dispatcher keeps the
    last batch's items referenced until that endpoint's next batch (`CorkDispatcher`'s `inputs_info`), which
    held up to a request's worth of images per endpoint after the answer. `Image.close()` drops the pixel
    memory whoever still holds the item."""
    try:
        yield
    finally:
        for item in items:
            item.image.close()


class ImageBatchInput(RequestParsingInput):
    """One request's images as batch items; subclasses say which options and items. Bind limits with `with_limits`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    file_fields = (IMAGES_FIELD,)
    limits: ClassVar[UploadLimits]
    options_model: ClassVar[type[BaseModel]]

    @classmethod
    def with_limits(cls, limits: UploadLimits) -> type[Self]:
        """This input with `limits` bound: a subclass named like this class, so the OpenAPI page is unchanged."""
        bound_limits = limits

        class Bound(cls):  # type: ignore[valid-type,misc]
            limits = bound_limits

        Bound.__name__, Bound.__qualname__ = cls.__name__, cls.__qualname__
        return Bound

    @classmethod
    async def parse_request(cls, request: Request) -> Self:
        return cls.from_image_request(await read_image_request(request, cls.options_model, cls.limits))

    @classmethod
    def from_image_request(cls, request: ImageRequest[Any]) -> Self:
        raise NotImplementedError


class ClassifyInput(ImageBatchInput):
    options_model = ClassifyOptions
    wire_model = ClassifyForm

    images: SkipValidation[list[ClassifyItem]]

    @classmethod
    def from_image_request(cls, request: ImageRequest[ClassifyOptions]) -> "ClassifyInput":
        options = request.options
        return cls(images=[ClassifyItem(image, options.top_k, options.unknown_label) for image in request.images])


class EmbedInput(ImageBatchInput):
    options_model = EmbedOptions
    wire_model = EmbedForm

    images: SkipValidation[list[EmbedItem]]

    @classmethod
    def from_image_request(cls, request: ImageRequest[EmbedOptions]) -> "EmbedInput":
        return cls(images=[EmbedItem(image, request.options.normalize) for image in request.images])


class ClassifyOutput(MergingOutput, ClassifyResponse):
    pass


class EmbedOutput(MergingOutput, EmbedResponse):
    pass
