"""A bound on the wait BentoML's adaptive batching learns, so latency recovers after a burst.

BentoML 1.4's dispatcher (`bentoml._internal.marshal.dispatcher`) holds a request back, while the model is
idle, for as long as `Optimizer.wait`: the mean of the last 50 batches' "wait", the time from the first
request's arrival to the start of its batch, refreshed at most every 5 s. Under load that time is mostly
queueing behind the batch in progress (the model is busy), not a wait that filled a batch; yet afterwards a
lone request is held for about 0.95x that much before it runs, and that hold is measured as the next
batches' wait, so the estimate only shrinks by ~5% (plus one image's compute) per refresh: one client after
16 concurrent ones was held ~30-50 ms per request (measured, docs/BENCHMARKS.md) and took minutes to recover.
`max_latency_ms` does not bound this wait (it only cancels requests that waited longer), and BentoML 1.4 has
no setting for it (a `target_latency_ms` batching strategy was proposed upstream, bentoml/BentoML#3630, and
not merged).

`bound_batch_wait(seconds)` caps the learned wait at each refresh. With 0 (the default,
TRANSFER_SERVE_MAX_BATCH_WAIT_MS), a batch starts as soon as the model is free and takes every request that
queued meanwhile (up to the max batch size): batches still form under load, from the requests that arrived
while the previous batch ran, and a lone request never waits for company.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger("bentoml.transfer_serve")

_bound_s: float | None = None


def bound_batch_wait(seconds: float) -> None:
    """Cap `Optimizer.wait` of every adaptive-batching dispatcher in this process at `seconds` (patched once;
    a later call changes the bound)."""
    global _bound_s
    from bentoml._internal.marshal.dispatcher import Optimizer

    _bound_s = max(0.0, float(seconds))
    original = Optimizer.trigger_refresh
    if getattr(original, "_bounds_wait", False):
        return

    @functools.wraps(original)
    def trigger_refresh(self: Any) -> None:
        original(self)
        if _bound_s is not None and self.wait > _bound_s:
            logger.debug("adaptive batching: learned wait %.1f ms capped at %.1f ms", self.wait * 1e3, _bound_s * 1e3)
            self.wait = _bound_s

    trigger_refresh._bounds_wait = True  # type: ignore[attr-defined]
    Optimizer.trigger_refresh = trigger_refresh  # type: ignore[method-assign]
