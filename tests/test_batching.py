"""Adaptive batching recovers after a burst: the wait BentoML's dispatcher learns under load is capped
(service/bentoml_compat.py, bound_batch_wait), so one client after a burst of concurrent ones is served as fast as before it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.bentoml_compat import bound_batch_wait

BURST_SLACK_S = 0.010


def test_the_learned_wait_is_capped_at_the_bound():
    from bentoml._internal.marshal.dispatcher import Optimizer

    bound_batch_wait(0.0)
    optimizer = Optimizer(max_latency=10.0)
    for _ in range(20):  # a burst: every batch's first request queued 50 ms behind the batch in progress
        optimizer.log_outbound(n=16, wait=0.05, duration=0.1)
    Optimizer.trigger_refresh.__wrapped__(optimizer)  # BentoML's own refresh learns the 50 ms...
    assert optimizer.wait == pytest.approx(0.05)
    optimizer.trigger_refresh()  # ...which the bound takes away
    assert optimizer.wait == 0.0
    bound_batch_wait(0.002)
    optimizer.trigger_refresh()
    assert optimizer.wait == pytest.approx(0.002)
    bound_batch_wait(0.0)


@pytest.fixture(scope="module")
def serving_benchmark():
    from test_benchmarks import load

    return load("serving")


@pytest.fixture(scope="module")
def full_size_artifact(serving_benchmark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """efficientnet_lite0 at its 224 px (random weights: the speed is the same), as in the issue. The session's
    32 px artifact runs a batch too fast for the burst to teach BentoML a wait that shows (measured: p50 3 -> 5
    ms without the bound), so it cannot tell the bug from its fix."""
    from common import export_model

    return export_model(tmp_path_factory.mktemp("full_size"), "efficientnet_lite0", "none")


@pytest.mark.slow
def test_latency_after_a_burst_is_what_it_was_before(serving_benchmark, full_size_artifact: Path, tmp_path: Path):
    """quiet (1 client, 6 s) -> burst (16 clients, 8 s) -> quiet (6 s) on one real server: the second quiet
    phase's p50 is within 1.5x of the first, plus BURST_SLACK_S.

    Noise on the shared 2-core machine: with the bound, consecutive quiet phases' p50s were 17 -> 34, 36 -> 26
    and 40 -> 44 ms while other engineers' jobs ran (load average 5-10); without it the burst's learned wait
    held every request after it: 24 -> 83, 33 -> 81 and 31 -> 108 ms (docs/BENCHMARKS.md). So 10 ms of slack,
    and one more try on a fresh server (a fresh server has learned nothing) when a neighbour's load spike
    still fails the first: the bug fails every try, since it holds every request after the burst.
    BURST_TEST_WAIT_MS=1000000 serves without the bound (BentoML's own behaviour): the test then fails."""
    from test_service import running_server

    serving = serving_benchmark
    extra = {"TRANSFER_SERVE_MAX_BATCH_WAIT_MS": os.environ["BURST_TEST_WAIT_MS"]} if "BURST_TEST_WAIT_MS" in os.environ else {}
    tries = []
    for attempt in range(2):
        home = tmp_path / f"try{attempt}"
        home.mkdir()
        with running_server(full_size_artifact, home, TRANSFER_SERVE_MAX_LATENCY_MS="60000", **extra) as client:
            url = str(client.base_url).rstrip("/")
            # phases of fixed length: a neighbour's second of load moves a p50 over hundreds of requests little
            phases = serving.quiet_burst_quiet(url, serving.digit_pngs(), quiet_requests=10**9, quiet_seconds=6,
                                               burst_clients=16, burst_seconds=8)
        rows = [serving.phase_row(name, 16 if name == "burst" else 1, *result) for name, result in phases.items()]
        print(serving.table(serving.BURST_HEADERS, rows))
        tries.append(rows)
        for latencies, errors, _ in phases.values():
            assert not errors and len(latencies) >= 50, rows
        before = serving.percentile(phases["quiet"][0], 50)
        after = serving.percentile(phases["quiet after"][0], 50)
        if after <= 1.5 * before + BURST_SLACK_S:
            break
    else:
        pytest.fail(f"p50 after the burst above 1.5x before + {BURST_SLACK_S * 1e3:.0f} ms in every try: {tries}")
