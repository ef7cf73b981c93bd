"""The real server (`transfer-serve serve ARTIFACT`, a subprocess on a free 127.0.0.1 port) over HTTP:
answers agree with the offline Predictor, concurrent requests are batched, every bad input gets its 4xx
and the server keeps answering, the OpenAPI page documents the endpoints, and `bentoml build` works."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.soak_load import SERVER_ENV, server_client
from models.predictor import Predictor, l2_normalize
from models.decoding import load_image
from service.launch import ServerStartError
from test_service_units import zero_width_png

pytestmark = pytest.mark.slow

__all__ = ["SERVER_ENV", "running_server"]  # used by conftest and the reliability tests


@contextlib.contextmanager
def running_server(artifact_dir: Path, home: Path, *options: str, ready_timeout_s: float = 150,
                   **settings: str) -> Iterator[httpx.Client]:
    """`transfer-serve serve ARTIFACT` on a free loopback port; yields a client once /readyz says ready."""
    try:
        with server_client(artifact_dir, home, *options, ready_timeout_s=ready_timeout_s, **settings) as client:
            yield client
    except ServerStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(artifact_dir, tmp_path_factory.mktemp("bentoml_home"), **SERVER_ENV) as client:
        yield client


@pytest.fixture(scope="module")
def digit_files(digits_dir: Path) -> list[Path]:
    return [sorted((digits_dir / label).glob("*.png"))[i] for label in "0123" for i in range(2)]


@pytest.fixture(scope="module")
def offline(artifact_dir: Path, digit_files: list[Path]):
    return Predictor.from_artifact(artifact_dir).predict([load_image(p) for p in digit_files])


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def assert_serving(server: httpx.Client, digit_files: list[Path], offline) -> None:
    response = server.post("/classify", files=upload(digit_files[:1]), data={"top_k": "1"})
    assert response.status_code == 200, response.text
    best = int(np.argmax(offline.probabilities[0]))
    assert response.json()["predictions"][0]["top_k"][0]["label"] == str(best)


# --- answers -----------------------------------------------------------------------------------------------------


def test_ready_and_alive(server):
    assert server.get("/readyz").status_code == 200
    assert server.get("/livez").status_code == 200


def test_classify_agrees_with_the_offline_model(server, digit_files, offline, artifact_dir):
    response = server.post("/classify", files=upload(digit_files), data={"top_k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    manifest = Predictor.from_artifact(artifact_dir).manifest
    assert body["model"] == {"name": manifest.name, "version": manifest.version}
    assert len(body["predictions"]) == len(digit_files)
    for prediction, probabilities in zip(body["predictions"], offline.probabilities):
        order = np.argsort(-probabilities, kind="stable")[:3]
        assert [s["label"] for s in prediction["top_k"]] == [manifest.labels[i] for i in order]
        served = [s["probability"] for s in prediction["top_k"]]
        np.testing.assert_allclose(served, probabilities[order], atol=1e-5)


def test_json_base64_variant_matches_multipart(server, digit_files):
    images = [base64.b64encode(p.read_bytes()).decode() for p in digit_files[:3]]
    as_json = server.post("/classify", json={"images": images, "top_k": 2})
    as_files = server.post("/classify", files=upload(digit_files[:3]), data={"top_k": "2"})
    assert as_json.status_code == 200 and as_json.json() == as_files.json()


def test_top_k_is_capped_at_the_number_of_classes(server, digit_files):
    response = server.post("/classify", files=upload(digit_files[:1]), data={"top_k": "50"})
    top = response.json()["predictions"][0]["top_k"]
    assert sorted(s["label"] for s in top) == ["0", "1", "2", "3"]
    assert sum(s["probability"] for s in top) == pytest.approx(1.0, abs=1e-5)


def test_embed_matches_the_artifact_embeddings(server, digit_files, offline):
    body = server.post("/embed", files=upload(digit_files)).json()
    embeddings = np.asarray(body["embeddings"], dtype=np.float32)
    assert body["dim"] == offline.embeddings.shape[1] and body["normalized"] is False
    np.testing.assert_allclose(embeddings, offline.embeddings, atol=1e-5)
    normalized = server.post("/embed", json={
        "images": [base64.b64encode(p.read_bytes()).decode() for p in digit_files], "normalize": True,
    }).json()  # fmt: skip
    np.testing.assert_allclose(np.asarray(normalized["embeddings"]), l2_normalize(offline.embeddings), atol=1e-5)


def test_extraction_job_embeddings_equal_the_service_embed_answer(server, digit_files, offline, artifact_dir, tmp_path):
    """The batch job and the HTTP service share runtime and preprocessing: same image, same vector."""
    import pandas as pd

    from extraction.config import ExtractionConfig
    from extraction.job import run_extraction

    manifest = tmp_path / "inputs.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in digit_files))
    run_extraction(ExtractionConfig(artifact=artifact_dir, input=manifest, output=tmp_path / "out", workers=0,
                                    show_progress=False))
    rows = pd.read_parquet(tmp_path / "out").set_index("path")
    job = np.stack([rows.loc[str(p.resolve()), "embedding"] for p in digit_files]).astype(np.float32)
    served = np.asarray(server.post("/embed", files=upload(digit_files)).json()["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(job, served, atol=1e-5)
    np.testing.assert_allclose(job, offline.embeddings, atol=1e-5)


def test_metadata_describes_model_runtime_and_limits(server, artifact_dir):
    body = server.post("/metadata").json()
    manifest = Predictor.from_artifact(artifact_dir).manifest
    assert body["labels"] == manifest.labels and body["backbone"] == manifest.backbone
    assert body["model"]["version"] == manifest.version and body["metrics"] == manifest.metrics
    assert body["embedding_dim"] == manifest.embedding_dim
    assert body["runtime"] == {"runtime": "onnx", "device": "cpu", "providers": "CPUExecutionProvider"}
    assert body["limits"]["max_images_per_request"] == 8 and body["limits"]["allow_url_fetch"] is False


def test_openapi_documents_every_endpoint(server):
    spec = server.get("/docs.json").json()
    for route, request_type in [("/classify", "multipart/form-data"), ("/embed", "multipart/form-data")]:
        operation = spec["paths"][route]["post"]
        schema = operation["requestBody"]["content"][request_type]["schema"]
        assert {"images"} <= set(schema["properties"]) and schema["required"] == ["images"]
        assert "properties" in operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert "labels" in spec["paths"]["/metadata"]["post"]["responses"]["200"]["content"]["application/json"]["schema"][
        "properties"
    ]


# --- out-of-distribution score (docs/OOD.md) ---------------------------------------------------------------------


def test_ood_score_is_identical_over_http_in_the_batch_job_and_offline(server, digit_files, artifact_dir, tmp_path):
    import pandas as pd

    from extraction.config import ExtractionConfig
    from extraction.job import run_extraction
    from test_ood_integration import noise_images

    noise = tmp_path / "noise.png"
    noise_images(1)[0].save(noise)
    paths = digit_files[:7] + [noise]  # the server takes 8 images per request
    offline = Predictor.from_artifact(artifact_dir).predict([load_image(p) for p in paths])
    served = server.post("/classify", files=upload(paths), data={"top_k": "2"}).json()["predictions"]
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    run_extraction(ExtractionConfig(artifact=artifact_dir, input=inputs, output=tmp_path / "out", workers=0,
                                    show_progress=False))
    rows = pd.read_parquet(tmp_path / "out").set_index("path").loc[[str(p.resolve()) for p in paths]]
    np.testing.assert_allclose([p["ood_score"] for p in served], offline.ood_scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rows["ood_score"].to_numpy(), offline.ood_scores, rtol=0, atol=1e-5)
    assert [p["unknown"] for p in served] == rows["unknown"].tolist() == offline.unknown.tolist()


def test_unknown_label_metadata_and_metrics(server, digit_files, artifact_dir):
    manifest = Predictor.from_artifact(artifact_dir).manifest
    assert server.post("/metadata").json()["ood"] == manifest.ood.model_dump(mode="json")
    before = _ood_metrics(server)
    paths = digit_files[:4]
    plain = server.post("/classify", files=upload(paths), data={"top_k": "2"}).json()["predictions"]
    asked = server.post("/classify", files=upload(paths), data={"top_k": "2", "unknown_label": "true"}).json()
    for original, answer in zip(plain, asked["predictions"]):
        if original["unknown"]:
            assert answer["top_k"] == [{"label": "unknown", "probability": None}, original["top_k"][0]]
        else:
            assert answer["top_k"] == original["top_k"]
    after = _ood_metrics(server)
    assert after["count"] - before["count"] == 2 * len(paths)  # every image /classify scored
    assert after["flagged"] - before["flagged"] == 2 * sum(p["unknown"] for p in plain)
    bad = server.post("/classify", files=upload(paths[:1]), data={"unknown_label": "yes"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("unknown_label: Input should be a valid boolean")


def _ood_metrics(server: httpx.Client) -> dict[str, float]:
    text = server.get("/metrics").text
    values = {}
    for key, pattern in (("count", r"^transfer_serve_ood_score_count(?:{[^}]*})? (\S+)$"),
                         ("flagged", r"^transfer_serve_ood_flagged_total(?:{[^}]*})? (\S+)$")):
        found = re.findall(pattern, text, flags=re.M)
        values[key] = sum(float(v) for v in found)
    assert re.search(r"^transfer_serve_ood_score_bucket{le=", text, flags=re.M), "no OOD score histogram in /metrics"
    return values


def test_an_old_artifact_without_ood_data_serves_without_a_score(artifact_dir, tmp_path, digit_files):
    """The one extra server of the OOD tests: an artifact exported before the detector, with the unknown label on."""
    from test_ood_integration import strip_ood

    old = strip_ood(artifact_dir, tmp_path / "old")
    (tmp_path / "home").mkdir()
    with running_server(old, tmp_path / "home", TRANSFER_SERVE_WARMUP_BATCHES="1",
                        TRANSFER_SERVE_UNKNOWN_AS_LABEL="true") as client:
        assert client.post("/metadata").json()["ood"] is None
        response = client.post("/classify", files=upload(digit_files[:2]), data={"top_k": "2"})
        assert response.status_code == 200, response.text
        for prediction in response.json()["predictions"]:
            assert prediction["ood_score"] is None and prediction["unknown"] is None
            assert "unknown" not in [s["label"] for s in prediction["top_k"]]
        assert "transfer_serve_ood_score" not in client.get("/metrics").text


# --- batching ----------------------------------------------------------------------------------------------------


def batch_size_observations(server: httpx.Client, method: str) -> tuple[float, float]:
    metrics = server.get("/metrics").text
    values = {}
    for kind in ("sum", "count"):
        pattern = rf'^bentoml_service_adaptive_batch_size_{kind}{{[^}}]*method_name="{method}"[^}}]*}} (\S+)$'
        values[kind] = sum(float(v) for v in re.findall(pattern, metrics, flags=re.M))
    return values["sum"], values["count"]


def test_concurrent_requests_are_batched(server, digit_files, offline):
    sum_before, count_before = batch_size_observations(server, "classify")

    def classify(index: int) -> str:
        path = digit_files[index % len(digit_files)]
        response = server.post("/classify", files=upload([path]), data={"top_k": "1"})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["top_k"][0]["label"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        labels = list(pool.map(classify, range(48)))
    expected = [str(int(np.argmax(offline.probabilities[i % len(digit_files)]))) for i in range(48)]
    assert labels == expected
    batched_requests, batches = batch_size_observations(server, "classify")
    batched_requests -= sum_before
    batches -= count_before
    assert batched_requests == 48
    assert batches < batched_requests, "no batch held more than one request"


def test_a_bad_image_does_not_fail_the_requests_batched_with_it(server, digit_files, offline):
    def send(index: int) -> httpx.Response:
        if index % 4 == 0:
            return server.post("/classify", files=[("images", ("bad.png", b"garbage", "image/png"))])
        return server.post("/classify", files=upload([digit_files[index % len(digit_files)]]), data={"top_k": "1"})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(send, range(32)))
    for index, response in enumerate(responses):
        if index % 4 == 0:
            assert response.status_code == 422 and "not an image" in response.json()["error"]
        else:
            best = str(int(np.argmax(offline.probabilities[index % len(digit_files)])))
            assert response.status_code == 200 and response.json()["predictions"][0]["top_k"][0]["label"] == best


# --- bad input ---------------------------------------------------------------------------------------------------

JPEG = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")

BAD_REQUESTS = {
    "non-image bytes": (dict(files=[("images", ("a.png", b"hello, not an image", "image/png"))]), 422, "not an image"),
    "truncated JPEG": (dict(files=[("images", ("a.jpg", JPEG[: len(JPEG) // 2], "image/jpeg"))]), 422, "truncated"),
    "unsupported format": (
        dict(files=[("images", ("a.ppm", encode(Image.new("RGB", (8, 8)), "PPM"), "image/x-portable-pixmap"))]),
        422,
        "unsupported image format 'PPM'",
    ),
    "zero-size image": (dict(files=[("images", ("zero.png", zero_width_png(), "image/png"))]), 422, "zero-size image"),
    "empty file": (dict(files=[("images", ("empty.png", b"", "image/png"))]), 422, "empty file"),
    "over the pixel limit": (
        dict(files=[("images", ("big.png", encode(Image.new("L", (400, 400)), "PNG"), "image/png"))]),
        422,
        "over the limit of 10000",
    ),
    "too many images": (
        dict(files=[("images", ("a.png", JPEG, "image/jpeg"))] * 9),
        413,
        "too many images in one request: the limit is 8",
    ),
    "body over the byte limit": (
        dict(files=[("images", ("huge.png", b"\x89PNG" + bytes(1_200_000), "image/png"))]),
        413,
        "over the limit of 1000000 bytes",
    ),
    "missing images field": (dict(data={"top_k": "2"}), 400, "missing field 'images'"),
    "wrong field name": (dict(files=[("image", ("a.jpg", JPEG, "image/jpeg"))]), 400, "'image'"),
    "unknown option": (dict(json={"images": [base64.b64encode(JPEG).decode()], "k": 2}), 400, "unknown field 'k'"),
    "JSON without images": (dict(json={"top_k": 2}), 400, "missing field 'images'"),
    "invalid base64": (dict(json={"images": ["not base64!"]}), 400, "not valid base64"),
    "invalid JSON": (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "URL not fetched": (dict(json={"images": ["http://127.0.0.1:9/secret.png"]}), 400, "does not fetch image URLs"),
    "unsupported body type": (dict(content=JPEG, headers={"content-type": "image/jpeg"}), 415, "unsupported content"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("endpoint", ["/classify", "/embed"])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_stays_up(
    server, endpoint, case, digit_files, offline
):
    request, status, problem = BAD_REQUESTS[case]
    response = server.post(endpoint, **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and problem in body["error"]
    assert_serving(server, digit_files, offline)


@pytest.mark.parametrize(
    "endpoint, option, problem",
    [("/classify", {"top_k": "-1"}, "top_k: Input should be greater than or equal to 1"),
     ("/embed", {"normalize": "maybe"}, "normalize: Input should be a valid boolean")],
)  # fmt: skip
def test_bad_option_value_is_named(server, endpoint, option, problem, digit_files, offline):
    response = server.post(endpoint, files=upload(digit_files[:1]), data=option)
    assert response.status_code == 400 and response.json()["error"].startswith(problem)
    assert_serving(server, digit_files, offline)


def test_torchscript_in_bf16_serves_on_cpu(artifact_dir, tmp_path, digit_files):
    """The GPU configuration (TorchScript, reduced precision) exercised on CPU: checked against fp32 at load. Emulated
    bf16 loads slowly on CPU, and `serve` loads the model once itself before the worker does (measured 41 s wall,
    11 s CPU for the CLI's load at load average 16), hence the longer wait."""
    with running_server(artifact_dir, tmp_path, "--precision", "bf16", ready_timeout_s=300,
                        TRANSFER_SERVE_WARMUP_BATCHES="1") as client:
        runtime = client.post("/metadata").json()["runtime"]
        assert runtime["runtime"] == "torchscript" and runtime["precision"] == "bf16" and runtime["device"] == "cpu"
        assert float(runtime["top1_agreement_with_fp32"]) >= 0.95
        response = client.post("/classify", files=upload(digit_files[:3]), data={"top_k": "2"})
        assert response.status_code == 200 and len(response.json()["predictions"]) == 3


# --- the Bento ---------------------------------------------------------------------------------------------------


def test_bentoml_build_packs_service_and_model_offline(artifact_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFER_SERVE_")}
    env |= {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    root = Path(__file__).resolve().parent.parent
    imported = subprocess.run(
        [sys.executable, "-m", "cli", "import", str(artifact_dir)], env=env, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
    tag = re.search(r"model-store tag: (\S+)", imported.stdout).group(1)
    again = subprocess.run(
        [sys.executable, "-m", "cli", "import", str(artifact_dir)], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and tag in again.stdout  # importing the same artifact twice is harmless

    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(root), "--output", "tag"],
        env=env | {"TRANSFER_SERVE_MODEL": tag},
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    bento_dir = next((tmp_path / "bentoml" / "bentos" / "transfer-serve").glob("*/bento.yaml")).parent
    info = (bento_dir / "bento.yaml").read_text()
    assert f"tag: {tag}" in info and "TRANSFER_SERVE_MODEL" in info
    assert (bento_dir / "src" / "service" / "service.py").is_file()
    assert (bento_dir / "src" / "models" / "preprocessing.py").is_file()
    assert "FROM nvidia/cuda" in (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "torch" in requirements
