"""Graceful shutdown that refuses new connections at once instead of leaving them hanging.

On SIGTERM BentoML's worker (uvicorn) stops accepting and lets in-flight requests finish, but the listening
socket belongs to BentoML's process manager (circus), which keeps it open until every worker has exited:
a client that connects during the drain is queued by the kernel and waits unanswered (measured: 15 s of
read timeouts while one slow upload finished). `refuse_new_connections_on_shutdown` makes the worker, as
the first step of its shutdown, mark the service not ready and shut the shared listening socket down
(`shutdown(2)` acts on the socket, not on this process's descriptor), so new connections are refused by
the kernel while accepted requests still get their answers.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from typing import Any

logger = logging.getLogger("bentoml.transfer_serve")

_shutting_down = threading.Event()


def shutting_down() -> bool:
    return _shutting_down.is_set()


def stop_listening(servers: Any) -> None:
    """Shut down (not just close) the listening sockets of uvicorn's asyncio servers."""
    for server in servers:
        for listener in getattr(server, "sockets", None) or ():
            try:
                duplicate = socket.socket(fileno=os.dup(listener.fileno()))
            except OSError:
                continue
            with duplicate:
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                except OSError:  # already shut, or not a listening TCP socket
                    pass


def refuse_new_connections_on_shutdown() -> None:
    """Wrap `uvicorn.Server.shutdown` (once per process): not ready, stop listening, then uvicorn's drain."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - BentoML always brings uvicorn
        return
    original = uvicorn.Server.shutdown
    if getattr(original, "_refuses_new_connections", False):
        return

    @functools.wraps(original)
    async def shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        _shutting_down.set()
        stop_listening(getattr(self, "servers", ()))
        logger.info("shutting down: not ready, refusing new connections, finishing in-flight requests")
        await original(self, *args, **kwargs)

    shutdown._refuses_new_connections = True  # type: ignore[attr-defined]
    uvicorn.Server.shutdown = shutdown  # type: ignore[method-assign]
