"""A JSON 404 for paths the server does not serve, like every other client error.

Starlette answers an unknown path with a plain-text "Not Found"; this middleware answers it with the
documented `{"error": ...}` body instead (the path cut to a bounded length). That unknown paths do not
grow BentoML's per-path metrics is `service.bentoml_compat`'s route-labelled metrics, not this module.
"""

from __future__ import annotations

import json

from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_PATH_IN_MESSAGE = 80


class AnswerUnknownPaths:
    """ASGI middleware: 404 for HTTP paths that no route of the application matches (any method)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_routed(scope):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        shown = path if len(path) <= MAX_PATH_IN_MESSAGE else path[:MAX_PATH_IN_MESSAGE] + "…"
        body = json.dumps({"error": f"no such endpoint: {shown!r}"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _is_routed(scope: Scope) -> bool:
    """True when a route of the Starlette application handling `scope` matches its path (a method mismatch
    counts as routed: the application answers 405 under the route's own, bounded, label)."""
    router = getattr(scope.get("app"), "router", None)
    if router is None:  # not under a Starlette application: nothing to check against
        return True
    return any(route.matches(scope)[0] != Match.NONE for route in router.routes)
