"""service/request_guard.py in-process: Content-Length with Transfer-Encoding is refused before the app runs, and a
body that does not arrive in time raises RequestTimeout (BentoML's 408) with `Connection: close` on the answer."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.errors import RequestTimeout
from service.request_guard import RequestGuard


def call(guard: RequestGuard, headers: list[tuple[bytes, bytes]], receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(guard({"type": "http", "headers": headers, "path": "/classify"}, receive, send))
    return sent


def test_content_length_with_transfer_encoding_is_refused_before_the_app():
    async def app(scope, receive, send) -> None:  # pragma: no cover - must not run
        raise AssertionError("the app ran")

    sent = call(RequestGuard(app), [(b"Content-Length", b"4"), (b"transfer-encoding", b"chunked")], None)
    assert sent[0]["status"] == 400 and (b"connection", b"close") in sent[0]["headers"]
    assert "Transfer-Encoding" in json.loads(sent[1]["body"])["error"]


def test_a_body_over_its_deadline_raises_408_and_the_answer_closes_the_connection():
    chunks = iter([{"type": "http.request", "body": b"{", "more_body": True}])

    async def trickle() -> dict:
        message = next(chunks, None)
        if message is None:
            await asyncio.sleep(10)  # the rest never comes
        return message

    async def app(scope, receive, send) -> None:  # what BentoML's endpoint wrapper does with the exception
        try:
            while (await receive()).get("more_body"):
                pass
        except RequestTimeout as exc:
            await send({"type": "http.response.start", "status": int(exc.error_code), "headers": []})
            await send({"type": "http.response.body", "body": str(exc).encode()})

    sent = call(RequestGuard(app, body_timeout_s=0.2), [(b"content-length", b"100")], trickle)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b"not received within 0.2 s" in sent[1]["body"]


def test_a_body_in_time_passes_and_waiting_for_disconnect_is_not_bounded():
    messages = iter([{"type": "http.request", "body": b"ab", "more_body": False}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        message = next(messages)
        if message["type"] == "http.disconnect":
            await asyncio.sleep(0.3)  # longer than the body deadline: must not raise
        return message

    async def app(scope, receive, send) -> None:
        assert (await receive())["body"] == b"ab"
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent = call(RequestGuard(app, body_timeout_s=0.1), [(b"content-length", b"2")], receive)
    assert sent[0]["status"] == 200 and sent[0]["headers"] == []


@pytest.mark.parametrize("kind", ["websocket", "lifespan"])
def test_other_scopes_pass_untouched(kind):
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    asyncio.run(RequestGuard(app)({"type": kind}, None, None))
    assert seen == [kind]
