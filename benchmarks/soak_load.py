"""The soak load generator shared by tests/test_reliability_soak.py and benchmarks/soak.py: bounded in count
and time, it checks every answer, samples the server's memory and splits latency into first and last fifths.

Needs the dev extras (httpx, psutil)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil
from PIL import Image

WARMUP = 100
"""Requests sent before the memory baseline is taken; not counted in the latency figures."""

SERVER_ENV = {
    "TRANSFER_SERVE_MAX_IMAGES_PER_REQUEST": "8",
    "TRANSFER_SERVE_MAX_PIXELS": "10000",  # 100 x 100: the digits are 8 x 8
    "TRANSFER_SERVE_MAX_BODY_BYTES": "1000000",
    "TRANSFER_SERVE_MAX_BATCH_SIZE": "16",
    "TRANSFER_SERVE_MAX_LATENCY_MS": "30000",  # a loaded 2-core test machine must not turn waits into 503s
}
"""The server limits of the service tests and of the soak (benchmark and test)."""


@contextlib.contextmanager
def server_client(artifact: Path, home: Path, *options: str, ready_timeout_s: float = 150, **settings: str) -> Iterator[httpx.Client]:
    """`transfer-serve serve ARTIFACT` on a free loopback port (`service.launch.local_server`), as an httpx client."""
    from service.launch import local_server

    with local_server(artifact, home, *options, ready_timeout_s=ready_timeout_s, **settings) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


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
