"""Contract tests for service/bentoml_compat.py: what it relies on of BentoML's and uvicorn's internals is
still there and still behaves as it did. A bentoml or uvicorn upgrade that changes any of it fails here,
by name, instead of silently changing the service's error bodies, OpenAPI page or shutdown."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
from http import HTTPStatus

import bentoml
import pytest
import uvicorn
from bentoml import IODescriptor
from bentoml.exceptions import BentoMLException
from starlette.testclient import TestClient

from service import bentoml_compat
from service.bentoml_compat import (
    TESTED_VERSIONS,
    IncompatibleInternals,
    JSONErrorBody,
    check_compatibility,
    error_message,
    installed_versions,
    major_minor,
    missing_internals,
    refuse_new_connections_on_shutdown,
)
from service.bento_io import ClassifyInput, ClassifyOutput
from service.uploads import UploadLimits

# --- versions and attributes -------------------------------------------------------------------------------------


def test_installed_versions_are_the_tested_ones():
    installed = {package: major_minor(version) for package, version in installed_versions().items()}
    assert installed == TESTED_VERSIONS, (
        "bentoml/uvicorn differ from what service/bentoml_compat.py was tested with: make this file pass, "
        "then update TESTED_VERSIONS"
    )


def test_every_internal_relied_upon_is_present():
    assert missing_internals() == []


def test_untested_version_with_internals_present_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="bentoml.transfer_serve"):
        check_compatibility({"bentoml": "1.5.0", "uvicorn": TESTED_VERSIONS["uvicorn"] + ".0"})
    assert "not bentoml 1.5.0" in caplog.text


def test_untested_version_with_an_internal_gone_raises_naming_it(monkeypatch):
    monkeypatch.setitem(bentoml_compat.IO_DESCRIPTOR_HOOKS, "from_http_request_v2", ("request",))
    with pytest.raises(IncompatibleInternals, match="from_http_request_v2"):
        check_compatibility({"bentoml": "2.0.0", "uvicorn": "0.54.0"})
    check_compatibility({"bentoml": TESTED_VERSIONS["bentoml"] + ".9", "uvicorn": TESTED_VERSIONS["uvicorn"] + ".1"})


# --- 1. IO descriptor hooks --------------------------------------------------------------------------------------


def test_bentoml_calls_the_overridden_io_hooks():
    from _bentoml_impl.server.app import ServiceAppFactory

    endpoint = inspect.getsource(ServiceAppFactory.api_endpoint)
    assert "input_spec.from_http_request(request, serde)" in endpoint
    assert "output_spec.to_http_response(" in endpoint
    for hook, parameters in bentoml_compat.IO_DESCRIPTOR_HOOKS.items():
        assert tuple(inspect.signature(getattr(IODescriptor, hook)).parameters) == parameters, hook


def test_input_documents_the_multipart_wire_body():
    bound = ClassifyInput.with_limits(UploadLimits(max_images=2, max_pixels=100, max_body_bytes=1000))
    assert bound.__name__ == "ClassifyInput" and bound.limits.max_images == 2 and issubclass(bound, ClassifyInput)
    assert bound.multipart_fields == ["images"] and bound.mime_type() == "multipart/form-data"
    components = bound.openapi_components("classify")
    assert set(components["ClassifyInput"].properties) == {"images", "top_k", "unknown_label"}  # the form, not the batch items


# --- 2. BentoML's client-error bodies, and the rewrite ------------------------------------------------------------


class _ProbeError(BentoMLException):
    error_code = HTTPStatus.BAD_REQUEST


def _probe_service():
    @bentoml.service(name="compat-probe")
    class Probe:
        started = False

        @bentoml.on_startup
        def mark_started(self) -> None:
            type(self).started = True

        @bentoml.api
        def fail(self, n: int) -> int:
            raise _ProbeError(f"bad n={n}")

    return Probe


def test_bentoml_client_error_bodies_and_their_rewrite():
    probe = _probe_service()
    app = probe.to_asgi()  # once per process: BentoML registers its metrics globally
    with TestClient(app) as raw:
        assert probe.inner.started, "@bentoml.on_startup hooks run when the app starts"
        listed = raw.post("/fail", json={"n": 1})
        validation = raw.post("/fail", json={"n": "x"})
        rewritten = TestClient(JSONErrorBody(app))  # what add_asgi_middleware(JSONErrorBody) puts in front
        rewritten_listed = rewritten.post("/fail", json={"n": 1})
        rewritten_validation = rewritten.post("/fail", json={"n": "x"})
    assert (listed.status_code, listed.json()) == (400, [{"error": "bad n=1"}])  # bentoml/BentoML#4232
    assert validation.status_code == 400
    assert validation.json()["error"] == "1 validation error for Input"
    assert validation.json()["detail"][0]["loc"] == ["n"] and validation.json()["detail"][0]["msg"]
    assert error_message(listed.json()) == "bad n=1"
    assert error_message(validation.json()).startswith("n: Input should be a valid integer")

    assert (rewritten_listed.status_code, rewritten_listed.json()) == (400, {"error": "bad n=1"})
    body = rewritten_validation.json()
    assert list(body) == ["error"] and body["error"].startswith("n: Input should be a valid integer")


def test_merging_output_merges_one_requests_share():
    from _bentoml_impl.serde import ALL_SERDE

    from models.predictor import TopK
    from service.schemas import ClassifyResponse, ModelRef

    model = ModelRef(name="m", version="1")
    parts = [ClassifyResponse.for_image(model, TopK(labels=[c], probabilities=[0.5])) for c in "ab"]
    response = asyncio.run(ClassifyOutput.to_http_response(parts, ALL_SERDE["application/json"]()))
    body = b"".join(bytes(chunk) for chunk in response.body_iterator)
    assert [p["top_k"][0]["label"] for p in json.loads(body)["predictions"]] == ["a", "b"]


# --- 3. uvicorn's shutdown ---------------------------------------------------------------------------------------


def test_bentoml_workers_run_uvicorn_server_which_awaits_shutdown():
    import _bentoml_impl.worker.service as worker

    assert "uvicorn.Server(config).run(" in inspect.getsource(worker)
    assert "await self.shutdown(sockets=sockets)" in inspect.getsource(uvicorn.Server._serve)


def test_shutdown_wrapper_runs_callbacks_stops_listening_then_drains(monkeypatch):
    monkeypatch.setattr(uvicorn.Server, "shutdown", uvicorn.Server.shutdown)  # restored after the test
    calls: list[str] = []
    refuse_new_connections_on_shutdown(lambda: calls.append("first"))
    wrapper = uvicorn.Server.shutdown
    refuse_new_connections_on_shutdown(lambda: calls.append("second"))
    assert uvicorn.Server.shutdown is wrapper, "installed once per process"

    async def app(scope, receive, send) -> None:  # pragma: no cover - never called
        raise AssertionError

    async def serve_then_shut_down() -> int:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="error"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        assert server.servers and all(s.sockets for s in server.servers), "uvicorn's Server.servers"
        port = server.servers[0].sockets[0].getsockname()[1]
        server.should_exit = True  # uvicorn's main loop ends, then it awaits self.shutdown(sockets=...)
        await serving
        return port

    port = asyncio.run(serve_then_shut_down())
    assert calls == ["first", "second"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_service_installs_the_shutdown_wrapper_from_its_startup_hook_not_at_import():
    from service.service import TransferServe

    assert not hasattr(uvicorn.Server.shutdown, "_before_shutdown"), "importing the service patches nothing"
    assert getattr(TransferServe.inner.refuse_new_connections_on_shutdown, "__bentoml_startup_hook__", False)
    assert JSONErrorBody in [middleware for middleware, _ in TransferServe.middlewares]
