"""Unknown paths are answered before BentoML's per-path metrics see them."""

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.unknown_paths import AnswerUnknownPaths


def _app(seen: list[str]) -> TestClient:
    class Record:
        """Stands where BentoML's metrics middleware sits: inside the service's own middlewares."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.app(scope, receive, send)

    routes = [Route("/classify", lambda r: PlainTextResponse("ok"), methods=["POST"]), Route("/livez", lambda r: PlainTextResponse("ok"))]
    return TestClient(Starlette(routes=routes, middleware=[Middleware(AnswerUnknownPaths), Middleware(Record)]))


def test_unknown_paths_get_a_json_404_and_never_reach_the_metrics():
    seen: list[str] = []
    client = _app(seen)
    for i in range(300):
        response = client.get(f"/random-{i}/x")
        assert response.status_code == 404 and "no such endpoint" in response.json()["error"]
    assert seen == []


def test_known_routes_pass_through_also_with_the_wrong_method():
    seen: list[str] = []
    client = _app(seen)
    assert client.post("/classify").text == "ok"
    assert client.get("/classify").status_code == 405
    assert client.get("/livez").status_code == 200
    assert seen == ["/classify", "/classify", "/livez"]


def test_long_paths_are_cut_in_the_message():
    response = _app([]).get("/" + "a" * 5000)
    assert response.status_code == 404 and len(response.json()["error"]) < 200
