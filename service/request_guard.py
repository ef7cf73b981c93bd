"""Two checks on every HTTP request, as an ASGI middleware (BentoML's supported `add_asgi_middleware`):

- **Content-Length together with Transfer-Encoding** is refused with 400 and `Connection: close`, before the
  app sees the request. h11 accepts it (Transfer-Encoding wins), but a proxy in front that frames the body by
  Content-Length would disagree with this server about where the request ends: request smuggling.
- **The body has a deadline**: once the app starts reading it, the whole body must arrive within
  `body_timeout_s`. Past it, reading raises `RequestTimeout` (a `BentoMLException`, so BentoML answers 408
  `{"error": ...}`) and the response carries `Connection: close`, so uvicorn closes the connection instead
  of reading a trickle forever. Keep it below BentoML's `traffic.timeout` (60 s), which answers 504 but
  leaves the connection open.

The request head's deadline is the protocol's (`service.bentoml_compat.GuardedH11Protocol`): a middleware
only sees a request once its head is complete.
"""

from __future__ import annotations

import json

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import RequestTimeout

CL_WITH_TE = "Content-Length and Transfer-Encoding together are not allowed"


class RequestGuard:
    """ASGI middleware: refuse Content-Length with Transfer-Encoding; bound the time to receive the body."""

    def __init__(self, app: ASGIApp, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name.lower() for name, _ in scope["headers"]}
        if b"content-length" in names and b"transfer-encoding" in names:
            await _refuse(send, 400, CL_WITH_TE)
            return
        deadline: float | None = None
        body_done = False
        timed_out = False

        async def receive_in_time() -> Message:
            nonlocal deadline, body_done, timed_out
            if body_done:  # after the body only http.disconnect comes: waiting for it is not bounded here
                return await receive()
            if deadline is None:
                deadline = anyio.current_time() + self.body_timeout_s
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0)):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise RequestTimeout(f"request body not received within {self.body_timeout_s:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_closing_after_timeout(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_in_time, send_closing_after_timeout)


async def _refuse(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
