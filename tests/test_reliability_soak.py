"""Soak over loopback, bounded in count and time: no failed request, steady memory, stable latency.

`soak()` (benchmarks/soak_load.py) is shared with benchmarks/soak.py, which runs a longer soak and prints the figures."""

from __future__ import annotations

import os

import pytest

from benchmarks.soak_load import soak

pytestmark = pytest.mark.slow

SOAK_REQUESTS = int(os.environ.get("TRANSFER_SERVE_SOAK_REQUESTS", "2000"))
SOAK_SECONDS = 180  # the test stops sending after this long, whatever the count
RSS_GROWTH_BOUND_MB = 64  # server process tree, after warm-up vs at the end


def test_soak_no_failures_steady_memory_stable_latency(reliability_server):
    result = soak(reliability_server, SOAK_REQUESTS, SOAK_SECONDS)
    print("\nsoak:", result.summary())
    assert not result.failures, result.failures[:5]
    assert result.requests >= min(SOAK_REQUESTS, 500), "too few requests within the time limit to judge"
    assert result.rss_end_mb - result.rss_after_warmup_mb < RSS_GROWTH_BOUND_MB, result.summary()
    # stable latency: the last fifth's median within 3x (plus 50 ms of noise on a shared machine) of the first's
    assert result.latency_last_ms[0] < 3 * result.latency_first_ms[0] + 50, result.summary()
