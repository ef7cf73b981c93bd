"""The BentoML service: `bentoml serve service.service:TransferServe` (or `transfer-serve serve ARTIFACT`).

Configured by `TRANSFER_SERVE_*` environment variables (service/settings.py). /classify and /embed are
batchable: concurrent requests share one forward pass of at most `max_batch_size` images; each request is
parsed, checked and decoded on its own first (service/bento_io.py), so a bad upload never joins a batch.
What this relies on of BentoML's and uvicorn's internals is in service/bentoml_compat.py, installed in each
worker by the `@bentoml.on_startup` hook below.
"""

from __future__ import annotations

import os
import threading

import bentoml
from bentoml.models import BentoModel
from PIL import Image

from models.memory import configure_allocator
from models.predictor import NonFiniteOutputError, Outputs, l2_normalize
from service.bento_env import baked_envs
from service.bento_io import (
    ClassifyInput,
    ClassifyItem,
    ClassifyOutput,
    EmbedInput,
    EmbedItem,
    EmbedOutput,
    released_after,
)
from service.errors import ModelOutputError
from service.bentoml_compat import JSONErrorBody, bound_batch_wait, install_http_guards, install_in_worker
from service.loading import load_predictor, open_artifact, served_artifact, warm_up
from service.ood_metrics import OODMetrics
from service.schemas import ClassifyResponse, EmbedResponse, ModelMetadata, ModelRef
from service.request_guard import RequestGuard
from service.settings import REQUEST_TIMEOUT_S, ServiceSettings
from service.unknown_paths import AnswerUnknownPaths
from service.worker_lifetime import bind_to_server, counting_start

bind_to_server()  # workers die with the serving process; it exits non-zero when they cannot start
settings = ServiceSettings.from_env(baked_envs(__file__) | dict(os.environ))  # `bentoml serve <bento tag>` too
# at import, in every worker, before BentoML builds the app and uvicorn loads its config (no hook runs that early):
# route-labelled metrics and the guarded h11 protocol (header timeout, 431); see service/bentoml_compat.py
install_http_guards(settings.header_timeout_s, settings.send_timeout_s)
# the artifact, read and verified once per worker (None until it can be: the worker's start then says why)
artifact = served_artifact(settings)
# one set of limits (and one gate on concurrent decodes) for both APIs; images decode with the model's decode path
limits = settings.upload_limits(artifact.manifest.preprocessing if artifact is not None else None)
# max_batch_size 1 turns adaptive batching off (BentoML refuses a batchable API with a max batch of 1): each
# request then runs its own images in one forward pass, as soon as it arrives
BATCHING = (
    dict(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    if settings.max_batch_size > 1
    else dict(batchable=False)
)
bound_batch_wait(settings.max_batch_wait_ms / 1000)  # else a burst's queueing is held as a wait afterwards


@bentoml.service(name="transfer-serve", envs=settings.bento_envs(), traffic={"timeout": REQUEST_TIMEOUT_S})
class TransferServe:
    """Image classification and embeddings from a fine-tuned transfer-learning artifact."""

    stored_model = BentoModel(settings.model) if settings.model else None

    def __init__(self) -> None:
        with counting_start():  # a few failed starts in a row stop the server (service/worker_lifetime.py)
            self._start()

    def _start(self) -> None:
        configure_allocator()  # decoding memory goes back to the OS (models/memory.py)
        self.predictor = load_predictor(settings, artifact or open_artifact(settings, self.stored_model))
        self.model = ModelRef.of(self.predictor.manifest)
        ood = self.predictor.ood  # metrics are made here, in the worker (service/ood_metrics.py)
        self.ood_metrics = OODMetrics(ood.threshold) if ood is not None else None
        self.ready = warm_up(self.predictor, settings.warmup_batches, settings.max_batch_size)
        self.shutting_down = threading.Event()

    @bentoml.on_startup
    def refuse_new_connections_on_shutdown(self) -> None:
        """SIGTERM: readiness false, new connections refused at once, in-flight requests finish."""
        install_in_worker(before_shutdown=self.shutting_down.set)

    def __is_ready__(self) -> bool:
        return self.ready and not self.shutting_down.is_set()

    @bentoml.api(input_spec=ClassifyInput.with_limits(limits), output_spec=ClassifyOutput, **BATCHING)
    def classify(self, images: list[ClassifyItem]) -> list[ClassifyResponse]:
        """Top-k labels per image, with its out-of-distribution score and `unknown` flag: files under `images`
        (multipart), or JSON `{"images": [base64], "top_k": 3, "unknown_label": true}`."""
        with released_after(images):
            outputs = self.predict([item.image for item in images])
        scores, unknown = outputs.ood_scores, outputs.unknown
        if self.ood_metrics is not None:
            self.ood_metrics.record(scores, unknown)
        return [
            ClassifyResponse.for_image(
                self.model,
                self.predictor.top_k(row[None], item.top_k)[0],
                None if scores is None else float(scores[i]),
                None if unknown is None else bool(unknown[i]),
                settings.unknown_as_label if item.unknown_label is None else item.unknown_label,
            )
            for i, (row, item) in enumerate(zip(outputs.probabilities, images))
        ]

    @bentoml.api(input_spec=EmbedInput.with_limits(limits), output_spec=EmbedOutput, **BATCHING)
    def embed(self, images: list[EmbedItem]) -> list[EmbedResponse]:
        """Embedding per image: files under `images` (multipart), or JSON `{"images": [base64], "normalize": true}`."""
        with released_after(images):
            embeddings = self.predict([item.image for item in images]).embeddings
        return [
            EmbedResponse.for_image(self.model, l2_normalize(row[None])[0] if item.normalize else row, item.normalize)
            for row, item in zip(embeddings, images)
        ]

    def predict(self, images: list[Image.Image]) -> Outputs:
        """One forward pass for a batch; NaN or infinite outputs become a 500 naming them (models/predictor.py)."""
        try:
            return self.predictor.predict_finite(images)
        except NonFiniteOutputError as exc:
            raise ModelOutputError(str(exc)) from None

    @bentoml.api(route="/metadata")
    def metadata(self) -> ModelMetadata:
        """Labels, backbone, version, test metrics, the OOD detector, the runtime and device in use, and the limits."""
        return ModelMetadata.describe(self.predictor, settings.request_limits(), settings.unknown_as_label)


TransferServe.add_asgi_middleware(RequestGuard, body_timeout_s=settings.body_timeout_s)  # outermost of ours
TransferServe.add_asgi_middleware(JSONErrorBody)
TransferServe.add_asgi_middleware(AnswerUnknownPaths)
