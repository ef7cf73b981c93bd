"""Hostile requests against a real server: state an unauthenticated client must not be able to grow."""

from __future__ import annotations

import uuid

import httpx


def metric_series(client: httpx.Client) -> set[str]:
    """Every sample line of /metrics without its value: one entry per series."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {line.rsplit(" ", 1)[0] for line in response.text.splitlines() if line and not line.startswith("#")}


def test_random_paths_add_no_metric_series(reliability_server: httpx.Client):
    client = reliability_server
    assert client.get("/livez").status_code == 200
    before = metric_series(client)
    for _ in range(300):
        response = client.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex[:8]}")
        assert response.status_code == 404
        assert "no such endpoint" in response.json()["error"]
    after = metric_series(client)
    assert after == before, sorted(after - before)[:5]
