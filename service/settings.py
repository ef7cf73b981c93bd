"""The serving configuration: one frozen pydantic model read from `TRANSFER_SERVE_*` environment variables.

BentoML imports the service module in every worker (and in `bentoml build`), so the environment is the one
place an operator can configure all of them the same way: `TRANSFER_SERVE_MAX_BATCH_SIZE=64` sets
`max_batch_size`, and so on.
"""

from __future__ import annotations

import logging
import threading
import os
from pathlib import Path
from typing import Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.decode_limits import DEFAULT_MAX_DECODE_CPU_S
from models.decoding import DEFAULT_MAX_PIXELS
from models.memory import ALLOCATOR_ENV
from models.preprocessing import Preprocessing
from models.inference import InferenceFields
from service.schemas import RequestLimits
from service.uploads import UploadLimits

ENV_PREFIX = "TRANSFER_SERVE_"

REQUEST_TIMEOUT_S = 60
"""BentoML's `traffic.timeout`: a request with no response started after this long is answered 504."""

logger = logging.getLogger(__name__)


class ServiceSettings(InferenceFields):
    """Where the model comes from, how it runs, and what a request may contain."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    artifact: Optional[Path] = Field(None, description="Artifact directory to serve (TRANSFER_SERVE_ARTIFACT).")
    model: Optional[str] = Field(
        None, description="BentoML model-store tag to serve, e.g. 'digits:latest' (TRANSFER_SERVE_MODEL)."
    )
    expect_digest: Optional[str] = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="Serve only the artifact with this digest ('sha256:…', printed at export, shown by /metadata); "
        "any other, or an edited one, is refused at start.",
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most images in one forward pass (adaptive batching); 1 turns batching off."
    )
    max_latency_ms: int = Field(10_000, gt=0, description="Longest a request may wait for its batch (then 503).")
    max_batch_wait_ms: float = Field(
        0, ge=0, description="Longest adaptive batching holds a request for more to arrive while the model is idle "
        "(caps the wait BentoML learns under load; service/bentoml_compat.py)."
    )
    max_images_per_request: int = Field(32, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Per image, checked before decoding.")
    max_request_decode_bytes: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="Per request: the bytes its images take decoded (by mode, after reduced JPEG decoding), summed "
        "and checked from the headers before decoding (then 413).",
    )
    max_decode_cpu_s: float = Field(
        DEFAULT_MAX_DECODE_CPU_S,
        gt=0,
        description="Per image: CPU seconds its decode may take (header, pixels, conversion), checked as it runs "
        "(then 422). Decoding also stops when the request times out or its client disconnects.",
    )
    max_concurrent_decodes: int = Field(
        2, ge=1, description="Images decoded at the same time in one server process (bounds decoding memory)."
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    allow_url_fetch: bool = Field(False, description="Let clients name http(s) image URLs for the server to fetch.")
    url_fetch_timeout_s: float = Field(10.0, gt=0)
    warmup_batches: int = Field(2, ge=0, description="Forward passes run at load, before /readyz says ready.")
    header_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A request's line and headers must be complete this long after the connection opens (or the "
        "first byte after a response); else the connection is closed.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        lt=REQUEST_TIMEOUT_S,
        description="A request's body must be complete this long after the server starts reading it; else 408 "
        "and the connection is closed.",
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A response the client stops reading (the server's send buffer full) must drain within this "
        "long; else the connection is aborted and the response dropped.",
    )
    unknown_as_label: bool = Field(
        False,
        description="/classify answers the label 'unknown' first for images the model's out-of-distribution "
        "detector flags, unless a request sets unknown_label (docs/OOD.md).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceSettings":
        if self.artifact is not None and self.model is not None:
            raise ValueError("set TRANSFER_SERVE_ARTIFACT or TRANSFER_SERVE_MODEL, not both")
        return self

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
    ) -> "ServiceSettings":
        """Read every `TRANSFER_SERVE_<FIELD>` variable, then `overrides` (e.g. command-line options) on top, and
        validate the result once; unset fields keep their defaults."""
        environ = os.environ if environ is None else environ
        fields = set(cls.model_fields)
        values: dict[str, str] = {}
        for key, value in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                values[name] = value
            else:
                logger.warning("ignoring %s: not a serving setting (known: %s)", key, ", ".join(sorted(fields)))
        return cls.model_validate(values | dict(overrides or {}))

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings in another process (a server, a container)."""
        return {
            f"{ENV_PREFIX}{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in self.model_dump(exclude_defaults=True).items()
            if value is not None
        }

    def upload_limits(self, preprocessing: Preprocessing | None = None) -> UploadLimits:
        """The limits every request is parsed under, with one gate on concurrent decodes: call once per process
        and share the result between the APIs. `preprocessing` is the served model's (its decode path)."""
        return UploadLimits(
            max_images=self.max_images_per_request,
            max_pixels=self.max_pixels,
            max_request_decode_bytes=self.max_request_decode_bytes,
            max_decode_cpu_s=self.max_decode_cpu_s,
            decode_slots=threading.BoundedSemaphore(self.max_concurrent_decodes),
            preprocessing=preprocessing,
            max_body_bytes=self.max_body_bytes,
            allow_url_fetch=self.allow_url_fetch,
            url_fetch_timeout_s=self.url_fetch_timeout_s,
        )

    def request_limits(self) -> RequestLimits:
        return RequestLimits(**self.model_dump(include=set(RequestLimits.model_fields)))

    def bento_envs(self) -> list[dict[str, str]]:
        """These settings as Bento environment variables, so a built Bento serves as configured at build time.
        A local artifact directory is left out: a Bento carries its model in the model store. glibc's arena cap
        (models/memory.py) comes last."""
        return [
            {"name": name, "value": value}
            for name, value in self.to_env().items()
            if name != f"{ENV_PREFIX}ARTIFACT"
        ] + [{"name": name, "value": value} for name, value in ALLOCATOR_ENV.items()]
