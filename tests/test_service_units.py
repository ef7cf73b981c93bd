"""The serving modules without a server: settings, request parsing and decoding, error bodies, responses,
reduced-precision and CUDA-provider code paths on CPU."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from models.artifact import ArtifactError, load_artifact
from models.predictor import Predictor, TopK
from models.runtimes import OnnxRuntime, PrecisionError, TorchScriptRuntime
from service.bentoml_compat import JSONErrorBody, error_message
from service.errors import PayloadTooLarge, RequestError, UnprocessableImage
from service.launch import server_env
from service.loading import artifact_dir, warm_up
from service.model_store import store_tag, tag_part
from service.schemas import ClassifyOptions, ClassifyResponse, EmbedResponse, ModelRef
from service.settings import ServiceSettings
from service.uploads import (
    UploadLimits,
    decode_images,
    form_field_values,
    parse_json,
    read_image_request,
    validate_options,
)

LIMITS = UploadLimits(max_images=3, max_pixels=10_000, max_body_bytes=200_000)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def zero_width_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


PNG = encode(Image.new("RGB", (12, 10), (10, 200, 30)))


# --- settings ----------------------------------------------------------------------------------------------------


def test_settings_read_from_prefixed_environment():
    settings = ServiceSettings.from_env(
        {"TRANSFER_SERVE_MAX_BATCH_SIZE": "8", "TRANSFER_SERVE_ALLOW_URL_FETCH": "true", "HOME": "/root"}
    )
    assert settings.max_batch_size == 8 and settings.allow_url_fetch is True
    assert settings.runtime == "auto" and settings.device == "auto" and settings.artifact is None
    assert ServiceSettings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(
    "environ, problem",
    [
        ({"TRANSFER_SERVE_ARTIFACT": "/a", "TRANSFER_SERVE_MODEL": "m:latest"}, "not both"),
        ({"TRANSFER_SERVE_RUNTIME": "onnx", "TRANSFER_SERVE_PRECISION": "fp16"}, "torchscript"),
        ({"TRANSFER_SERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"TRANSFER_SERVE_DEVICE": "tpu"}, "device"),
        ({"TRANSFER_SERVE_BODY_TIMEOUT_S": "60"}, "body_timeout_s"),  # must stay below traffic.timeout
        ({"TRANSFER_SERVE_HEADER_TIMEOUT_S": "0"}, "header_timeout_s"),
    ],
)
def test_inconsistent_settings_are_refused(environ, problem):
    with pytest.raises(ValidationError, match=problem):
        ServiceSettings.from_env(environ)


def test_bento_envs_carry_settings_but_not_a_local_path():
    settings = ServiceSettings(artifact="/some/dir", max_latency_ms=50)
    assert settings.bento_envs() == [
        {"name": "TRANSFER_SERVE_MAX_LATENCY_MS", "value": "50"},
        {"name": "MALLOC_ARENA_MAX", "value": "2"},
    ]


def test_server_env_replaces_serving_variables_and_disables_tracking():
    env = server_env(ServiceSettings(artifact="/a"), {"PATH": "/bin", "TRANSFER_SERVE_MODEL": "x:1"})
    assert env == {"PATH": "/bin", "TRANSFER_SERVE_ARTIFACT": "/a", "BENTOML_DO_NOT_TRACK": "true", "MALLOC_ARENA_MAX": "2"}


def test_nothing_to_serve_is_a_clear_error():
    with pytest.raises(ArtifactError, match="TRANSFER_SERVE_ARTIFACT"):
        artifact_dir(ServiceSettings(), None)


def test_model_store_tags_are_valid():
    assert tag_part("My Model!") == "my-model"
    assert tag_part("20260101-120000") == "20260101-120000"
    with pytest.raises(ArtifactError):
        tag_part("!!!")


# --- request parsing ---------------------------------------------------------------------------------------------


def test_json_images_accept_base64_and_data_uris():
    b64 = base64.b64encode(PNG).decode()
    sources, options = parse_json(f'{{"images": ["{b64}", "data:image/png;base64,{b64}"], "top_k": 2}}'.encode())
    assert [s.data for s in sources] == [PNG, PNG] and options == {"top_k": 2}


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be an object"),
        (b'{"top_k": 1}', "missing field 'images'"),
        (b'{"images": []}', "non-empty list"),
        (b'{"images": [42]}', r"images\[0\] must be a base64 string"),
        (b'{"images": ["%%%"]}', r"images\[0\] is not valid base64"),
    ],
)
def test_malformed_json_requests_name_the_problem(body, problem):
    with pytest.raises(RequestError, match=problem):
        parse_json(body)


def test_deeply_nested_json_is_a_client_error():
    with pytest.raises(RequestError, match="nested too deeply"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "fields, problem",
    [({"top_k": True}, "top_k"), ({"top_k": "3"}, "top_k"), ({"top_k": 2.0}, "top_k")],
)
def test_json_options_are_not_coerced(fields, problem):
    with pytest.raises(RequestError, match=problem):
        validate_options(ClassifyOptions, fields)


def test_json_boolean_options_must_be_booleans():
    from service.schemas import EmbedOptions

    with pytest.raises(RequestError, match="normalize"):
        validate_options(EmbedOptions, {"normalize": "yes"})
    assert validate_options(EmbedOptions, {"normalize": True}).normalize is True


def test_form_fields_read_numbers_and_booleans_only():
    assert form_field_values({"top_k": "3", "normalize": "True", "x": "yes", "y": "2.5"}) == {
        "top_k": 3, "normalize": True, "x": "yes", "y": 2.5,
    }


def test_urls_are_kept_as_urls_not_fetched():
    sources, _ = parse_json(b'{"images": ["https://example.com/cat.png"]}')
    assert sources[0].url == "https://example.com/cat.png" and sources[0].data is None


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"", "empty file"),
        (b"plain text", "not an image"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:300], "truncated"),
        (encode(Image.new("RGB", (8, 8)), "PPM"), "unsupported image format"),
        (encode(Image.new("L", (200, 200))), "over the limit"),
        (zero_width_png(), "zero-size image"),
    ],
)
def test_undecodable_images_are_named(blob, problem):
    with pytest.raises(UnprocessableImage, match=problem) as raised:
        decode_images([("images[1] ('x.png')", PNG), ("images[2] ('bad')", blob)], LIMITS)
    assert str(raised.value).startswith("images[2] ('bad'): ")


def test_a_request_over_its_decode_budget_is_refused_before_decoding():
    limits = UploadLimits(max_images=3, max_pixels=10_000, max_body_bytes=200_000, max_request_decode_bytes=3 * 4 * 90 * 90)
    image = encode(Image.new("RGB", (90, 90)))
    assert len(decode_images([("a", image)] * 3, limits)) == 3  # RGB is held as 4 bytes a pixel
    with pytest.raises(PayloadTooLarge, match="max_request_decode_bytes"):
        decode_images([("a", image)] * 3 + [("b", encode(Image.new("L", (10, 10))))], limits)


def test_decodes_wait_for_a_slot_of_the_process(monkeypatch):
    import service.uploads as uploads

    limits = UploadLimits(max_images=3, max_pixels=10_000, max_body_bytes=200_000, decode_slots=threading.BoundedSemaphore(1))
    held, seen = [], []
    real = uploads.OpenedImage.decode

    def spy(self):
        held.append(limits.decode_slots._value)  # slots free while this decode runs
        return real(self)

    monkeypatch.setattr(uploads.OpenedImage, "decode", spy)
    decode_images([("a", PNG), ("b", PNG)], limits)
    assert held == [0, 0]
    assert limits.decode_slots.acquire(blocking=False)  # released afterwards


def _parsing_app(options_model) -> TestClient:
    async def endpoint(request: Request) -> JSONResponse:
        try:
            parsed = await read_image_request(request, options_model, LIMITS)
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.error_code.value)
        return JSONResponse({"sizes": [im.size for im in parsed.images], "options": parsed.options.model_dump()})

    return TestClient(Starlette(routes=[Route("/", endpoint, methods=["POST"])]))


def test_multipart_request_parsed_into_images_and_options():
    client = _parsing_app(ClassifyOptions)
    files = [("images", ("a.png", PNG, "image/png")), ("images", ("b.png", PNG, "image/png"))]
    response = client.post("/", files=files, data={"top_k": "2"})
    assert response.json() == {"sizes": [[12, 10], [12, 10]], "options": {"top_k": 2, "unknown_label": None}}


@pytest.mark.parametrize(
    "kwargs, status, problem",
    [
        (dict(data={"top_k": "2"}), 400, "missing field 'images'"),
        (dict(files=[("images", ("a.png", PNG, "image/png"))], data={"top_k": "zero"}), 400, "top_k"),
        (dict(files=[("images", ("a.png", PNG, "image/png"))], data={"top_k": "true"}), 400, "top_k"),
        (dict(files=[("images", ("a.png", PNG, "image/png"))], data={"topk": "1"}), 400, "unknown field 'topk'"),
        (dict(files=[("picture", ("a.png", PNG, "image/png"))]), 400, "'picture' must be a text field"),
        (dict(data={"images": "http://169.254.169.254/latest"}), 400, "does not fetch image URLs"),
        (dict(data={"images": "not a file"}), 400, "must be an uploaded file"),
        (dict(files=[("images", ("a.png", PNG, "image/png"))] * 4), 413, "too many images"),
        (dict(files=[("images", ("a.png", PNG, "image/png"))] * 9), 413, "too many images"),
        (dict(files=[("images", ("big.bin", b"x" * 300_000, "image/png"))]), 413, "over the limit of 200000 bytes"),
        (dict(content=b"raw", headers={"content-type": "image/png"}), 415, "unsupported content type"),
        (dict(files=[("images", ("t.txt", b"text", "text/plain"))]), 422, "not an image"),
    ],
)
def test_bad_requests_get_their_status_and_message(kwargs, status, problem):
    response = _parsing_app(ClassifyOptions).post("/", **kwargs)
    assert response.status_code == status
    assert problem in response.json()["error"]


@pytest.fixture
def image_host():
    """A loopback HTTP server with one PNG at /digit.png (and 404 elsewhere)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/digit.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(PNG) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(PNG)

        def log_message(self, *args) -> None:
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()
    host.server_close()


def test_urls_are_fetched_only_when_the_operator_allows_it(image_host):
    async def endpoint(request: Request) -> JSONResponse:
        limits = UploadLimits(max_images=2, max_pixels=10_000, max_body_bytes=10_000, allow_url_fetch=True)
        try:
            parsed = await read_image_request(request, ClassifyOptions, limits)
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.error_code.value)
        return JSONResponse({"sizes": [im.size for im in parsed.images]})

    client = TestClient(Starlette(routes=[Route("/", endpoint, methods=["POST"])]))
    assert client.post("/", json={"images": [f"{image_host}/digit.png"]}).json() == {"sizes": [[12, 10]]}
    missing = client.post("/", json={"images": [f"{image_host}/nothing.png"]})
    assert missing.status_code == 422 and "answered HTTP 404" in missing.json()["error"]
    refused = _parsing_app(ClassifyOptions).post("/", json={"images": [f"{image_host}/digit.png"]})
    assert refused.status_code == 400 and "does not fetch image URLs" in refused.json()["error"]


# --- error bodies ------------------------------------------------------------------------------------------------


def test_error_message_reads_bentoml_shapes():
    assert error_message([{"error": "bad top_k"}]) == "bad top_k"
    assert error_message({"error": "x", "detail": [{"loc": ["images", 0], "msg": "Field required"}]}) == (
        "images.0: Field required"
    )
    assert error_message({"labels": []}) is None


def test_json_error_body_middleware_rewrites_only_client_errors():
    async def listed(_: Request) -> JSONResponse:
        return JSONResponse([{"error": "too many images"}], status_code=413)

    async def fine(_: Request) -> JSONResponse:
        return JSONResponse([{"error": "not an error"}])

    app = Starlette(routes=[Route("/listed", listed), Route("/fine", fine)])
    client = TestClient(JSONErrorBody(app))
    assert client.get("/listed").json() == {"error": "too many images"}
    assert client.get("/listed").status_code == 413
    assert client.get("/fine").json() == [{"error": "not an error"}]


def test_request_errors_carry_http_statuses():
    assert RequestError("x").error_code == 400
    assert PayloadTooLarge("x").error_code == 413
    assert UnprocessableImage("x").error_code == 422


# --- responses ---------------------------------------------------------------------------------------------------


def test_one_image_responses_merge_in_order():
    model = ModelRef(name="m", version="1")
    parts = [ClassifyResponse.for_image(model, TopK(labels=[c], probabilities=[0.5])) for c in "ab"]
    merged = ClassifyResponse.merge(parts)
    assert [p.top_k[0].label for p in merged.predictions] == ["a", "b"] and merged.model == model
    vectors = [EmbedResponse.for_image(model, np.full(3, v, np.float32), False) for v in (1.0, 2.0)]
    assert EmbedResponse.merge(vectors).embeddings == [[1.0] * 3, [2.0] * 3]


# --- runtimes: the GPU code paths, exercised on CPU ---------------------------------------------------------------


def test_reduced_precision_is_checked_against_fp32_at_load(artifact_dir):
    artifact = load_artifact(artifact_dir)
    runtime = TorchScriptRuntime(artifact, device="cpu", precision="bf16")
    assert runtime.top1_agreement is not None and runtime.top1_agreement >= 0.95
    assert runtime.describe()["precision"] == "bf16" and "top1_agreement_with_fp32" in runtime.describe()
    with pytest.raises(PrecisionError, match="serve this model in fp32"):
        TorchScriptRuntime(artifact, device="cpu", precision="fp16", min_top1_agreement=1.01)


def test_onnx_cuda_request_falls_back_to_cpu_provider_without_a_gpu(artifact_dir):
    runtime = OnnxRuntime(load_artifact(artifact_dir), device="cuda")
    if "CUDAExecutionProvider" in runtime.providers:
        pytest.skip("a CUDA GPU is present")
    assert runtime.providers == ["CPUExecutionProvider"] and runtime.describe()["device"] == "cpu"


def test_warm_up_runs_forward_passes(artifact_dir):
    assert warm_up(Predictor.from_artifact(artifact_dir), batches=1, batch_size=2) is True


def test_store_tag_from_manifest(artifact_dir):
    manifest = load_artifact(artifact_dir).manifest
    assert store_tag(manifest) == f"{manifest.name}:{manifest.version}".lower()
    assert store_tag(manifest, "Other Name").startswith("other-name:")


# --- issue 21: bounded error answers, JSON bodies, pixels released after their batch ---------------------------


def test_an_error_naming_many_fields_names_a_few_and_counts_the_rest():
    fields = {f"key_{i:06d}_" + "x" * 200: 1 for i in range(100_000)}
    with pytest.raises(RequestError) as raised:
        validate_options(ClassifyOptions, fields)
    message = str(raised.value)
    assert len(message) < 1_000 and "and 99995 more errors" in message and message.count("unknown field") == 5


def test_request_error_messages_are_capped():
    assert len(str(RequestError("field " + "k" * 5_000_000 + " is given more than once"))) < 1_100


def test_a_four_xx_log_line_is_capped():
    import logging

    from service.bentoml_compat import ClientErrorsOneLine

    try:
        raise RequestError("x" * 1_000_000)
    except RequestError:
        import sys

        record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on /%s [POST]", ("p" * 20_000,), sys.exc_info())
    ClientErrorsOneLine().filter(record)
    assert record.levelno == logging.WARNING and len(record.getMessage()) < 1_100


def test_a_json_body_of_many_option_values_is_refused_before_parsing(monkeypatch):
    import json

    import service.uploads as uploads

    body = json.dumps({"images": [base64.b64encode(PNG).decode()], **{f"k{i}": i for i in range(10_000)}}).encode()
    parsed = []
    monkeypatch.setattr(uploads, "parse_json", lambda body: parsed.append(body))
    response = _parsing_app(ClassifyOptions).post("/", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "values, over the limit" in response.json()["error"]
    assert parsed == [] and len(response.text) < 1_000


def test_a_json_body_with_images_and_options_still_parses():
    body = {"images": ["data:image/png;base64," + base64.b64encode(PNG).decode()] * 3, "top_k": 2}
    response = _parsing_app(ClassifyOptions).post("/", json=body)
    assert response.status_code == 200 and response.json()["options"]["top_k"] == 2


def test_batch_pixels_are_released_after_the_forward_pass_even_when_it_fails():
    from service.bento_io import ClassifyItem, released_after

    items = [ClassifyItem(image=Image.new("RGB", (64, 64)), top_k=1) for _ in range(3)]
    with pytest.raises(RuntimeError), released_after(items):
        raise RuntimeError("forward pass failed")
    for item in items:
        with pytest.raises(ValueError, match="closed"):
            item.image.load()
