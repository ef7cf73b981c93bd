"""Soak over loopback, bounded in count and time: no failed request, steady memory, stable latency.

`soak()` is shared with benchmarks/soak.py, which runs a longer soak and prints the figures."""

from __future__ import annotations

import concurrent.futures
import io
import os
import time
from dataclasses import dataclass

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SOAK_REQUESTS = int(os.environ.get("TRANSFER_SERVE_SOAK_REQUESTS", "2000"))
SOAK_SECONDS = 180  # the test stops sending after this long, whatever the count
RSS_GROWTH_BOUND_MB = 64  # server process tree, after warm-up vs at the end
WARMUP = 100


@dataclass
class SoakResult:
    requests: int
    failures: list[str]
    seconds: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    latency_first_ms: tuple[float, float]  # p50, p99 of the first fifth of the (good) requests
    latency_last_ms: tuple[float, float]  # and of the last fifth

    def summary(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.0f} s ({self.requests / self.seconds:.1f}/s), "
            f"{len(self.failures)} failed; server RSS {self.rss_after_warmup_mb:.0f} MB after warm-up -> "
            f"{self.rss_end_mb:.0f} MB at the end (peak {self.rss_peak_mb:.0f} MB); latency p50/p99 "
            f"first fifth {self.latency_first_ms[0]:.0f}/{self.latency_first_ms[1]:.0f} ms, "
            f"last fifth {self.latency_last_ms[0]:.0f}/{self.latency_last_ms[1]:.0f} ms"
        )


def server_tree(port: int) -> list[psutil.Process]:
    for child in psutil.Process().children(recursive=True):
        try:
            if "bentoml" in " ".join(child.cmdline()) and str(port) in child.cmdline():
                return [child] + child.children(recursive=True)
        except psutil.Error:
            continue
    raise AssertionError(f"no server process on port {port}")


def rss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def soak(client: httpx.Client, count: int, time_limit_s: float, threads: int = 4) -> SoakResult:
    """`count` requests from `threads` threads: 1-3 image /classify and /embed (JSON and multipart), and
    every tenth a bad image that must get its 422. Memory is the server's process tree (psutil RSS)."""
    processes = server_tree(client.base_url.port)
    images = [png(seed) for seed in range(16)]
    deadline = time.monotonic() + time_limit_s
    latencies: list[tuple[int, float]] = []
    failures: list[str] = []
    rss_samples: list[float] = []

    def one(index: int) -> None:
        if time.monotonic() > deadline:
            return
        endpoint = "/classify" if index % 2 else "/embed"
        bad = index % 10 == 9
        files = [("images", (f"{index}.png", b"corrupt" if bad else images[(index + k) % 16], "image/png"))
                 for k in range(1 + index % 3)]  # fmt: skip
        started = time.perf_counter()
        try:
            response = client.post(endpoint, files=files)
        except httpx.HTTPError as exc:
            failures.append(f"{index}: {type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - started
        expected = 422 if bad else 200
        if response.status_code != expected:
            failures.append(f"{index}: {response.status_code} {response.text[:200]}")
        elif not bad:
            latencies.append((index, elapsed))
        if index % 50 == 0:
            rss_samples.append(rss_mb(processes))

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(WARMUP)))
        rss_warm = rss_mb(processes)
        list(pool.map(one, range(WARMUP, WARMUP + count)))
    seconds = time.monotonic() - started
    rss_end = rss_mb(processes)
    timed = [t * 1000 for i, t in sorted(latencies) if i >= WARMUP]
    fifth = max(1, len(timed) // 5)

    def p50_p99(values: list[float]) -> tuple[float, float]:
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))

    return SoakResult(
        requests=len(timed) + sum(1 for i in range(WARMUP, WARMUP + count) if i % 10 == 9),
        failures=failures, seconds=seconds, rss_after_warmup_mb=rss_warm, rss_end_mb=rss_end,
        rss_peak_mb=max(rss_samples + [rss_warm, rss_end]),
        latency_first_ms=p50_p99(timed[:fifth]), latency_last_ms=p50_p99(timed[-fifth:]),
    )  # fmt: skip


def test_soak_no_failures_steady_memory_stable_latency(reliability_server):
    result = soak(reliability_server, SOAK_REQUESTS, SOAK_SECONDS)
    print("\nsoak:", result.summary())
    assert not result.failures, result.failures[:5]
    assert result.requests >= min(SOAK_REQUESTS, 500), "too few requests within the time limit to judge"
    assert result.rss_end_mb - result.rss_after_warmup_mb < RSS_GROWTH_BOUND_MB, result.summary()
    # stable latency: the last fifth's median within 3x (plus 50 ms of noise on a shared machine) of the first's
    assert result.latency_last_ms[0] < 3 * result.latency_first_ms[0] + 50, result.summary()
