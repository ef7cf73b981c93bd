"""Requests within the DEFAULT limits that cost much to decode must not make the server hold much memory:
one such request grows the server's RSS (its whole process tree) by at most 600 MB at peak and keeps at
most 300 MB five seconds later; four at once grow it by at most 1 GB at peak. The payloads and the RSS
sampler are those of benchmarks/hostile.py (docs/RELIABILITY.md, "Hostile load", has the figures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from service.launch import local_server

pytestmark = pytest.mark.slow

MB = 1024 * 1024
PEAK_MB, KEPT_MB, CONCURRENT_PEAK_MB = 600, 300, 1000
"""The issue's targets. What is kept is asserted tighter (`KEPT_ASSERTED_MB`): before memory was given back
(models/memory.py) one 16-bit PNG request kept 246 MB, under the target but already most of it."""
KEPT_ASSERTED_MB = 150
SETTLE_S = 5.0


def hostile_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile.py"
    spec = importlib.util.spec_from_file_location("benchmark_hostile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with default limits (no TRANSFER_SERVE_* set) and an RSS sampler on its process tree."""
    bench = hostile_benchmark()
    with local_server(artifact_dir, tmp_path_factory.mktemp("hostile_memory_home")) as url:
        with bench.TreeRSS(bench.server_pid(url)) as rss:
            yield bench, url, rss


def test_truncated_jpeg_declaring_6000x6000_is_refused_without_eoi(server) -> None:
    bench, url, _ = server
    status, text = bench.post_embed(url, [bench.truncated_jpeg(eoi=False)], "t")
    assert status == 422 and "truncated" in text
    status, _ = bench.post_embed(url, [bench.truncated_jpeg(eoi=True)], "t")
    assert status == 200  # libjpeg pads the missing data with grey; nothing reliable tells it from a real photo


@pytest.mark.parametrize(
    "case",
    ["32 x 1 kB JPEG declaring 6000x6000", "14 x 6000x6000 16-bit PNG (the decode budget's most)"],
)
def test_one_expensive_request_is_bounded_and_given_back(server, case: str) -> None:
    bench, url, rss = server
    payloads = [bench.truncated_jpeg(eoi=True)] * 32 if case.startswith("32") else [bench.sixteen_bit_png()] * 14
    result = bench.run_case(url, rss, payloads, concurrent=1, settle_s=SETTLE_S)
    print(case, result)
    assert result["statuses"] == [200], result
    assert result["peak_growth_mb"] <= PEAK_MB, result
    assert result["kept_growth_mb"] <= min(KEPT_MB, KEPT_ASSERTED_MB), result


def test_sixteen_bit_pngs_over_the_decode_budget_are_refused_before_decoding(server) -> None:
    bench, url, rss = server
    result = bench.run_case(url, rss, [bench.sixteen_bit_png()] * 32, concurrent=1, settle_s=0)
    assert result["statuses"] == [413] and "max_request_decode_bytes" in result["answer"], result
    assert result["peak_growth_mb"] <= 50, result


@pytest.mark.parametrize("case", ["32 x 1 kB JPEG declaring 6000x6000", "4 x 6000x6000 16-bit PNG"])
def test_four_expensive_requests_at_once_are_bounded(server, case: str) -> None:
    bench, url, rss = server
    payloads = [bench.truncated_jpeg(eoi=True)] * 32 if case.startswith("32") else [bench.sixteen_bit_png()] * 4
    result = bench.run_case(url, rss, payloads, concurrent=4, settle_s=SETTLE_S)
    print("4 at once:", case, result)
    assert result["statuses"] == [200], result
    assert result["peak_growth_mb"] <= CONCURRENT_PEAK_MB, result
    assert result["kept_growth_mb"] <= min(KEPT_MB, KEPT_ASSERTED_MB), result


# --- issue 21: shapes and modes that defeated the decode budget, inputs that cost CPU, JSON bodies -------------


@pytest.mark.parametrize("case", ["w1", "w2", "w3", "w4", "w5", "w6", "w7"])
def test_very_wide_images_of_every_mode_and_format_are_bounded_and_given_back(server, case: str) -> None:
    """65,535 x 610 images (40 MP, short side under what reduction needed): 1-bit, grey, JPEG, palette GIF with
    transparency, 16-bit TIFF, a mix with RGBA PNG and WebP, and four requests at once (w6). On main: +920 to
    +2,467 MB peak."""
    bench, url, rss = server
    payloads, concurrent = bench.CASES[case][1]()
    result = bench.run_case(url, rss, payloads, concurrent=concurrent, settle_s=SETTLE_S)
    print(case, result)
    assert result["statuses"] == [200], result
    assert result["peak_growth_mb"] <= (CONCURRENT_PEAK_MB if concurrent > 1 else PEAK_MB), result
    assert result["kept_growth_mb"] <= min(KEPT_MB, KEPT_ASSERTED_MB), result


@pytest.mark.parametrize("case, limit", [("p1", "scans"), ("p2", "strips or tiles"), ("p3", "max_decode_cpu_s"),
                                         ("p4", "unsupported image format")])  # fmt: skip
def test_inputs_that_cost_cpu_are_refused_within_the_cpu_budget(server, case: str, limit: str) -> None:
    """A 3,000-scan JPEG (36 s of CPU on main), 2 million TIFF strips (past the 60 s timeout), a million PNG
    chunks (28 s), 30 MB of PPM whitespace (37 s): each a 422 naming its limit, for at most the 2 s decode
    budget plus the parsing of its body."""
    bench, url, rss = server
    payloads, _ = bench.CASES[case][1]()
    result = bench.run_case(url, rss, payloads, concurrent=1, settle_s=0)
    print(case, result)
    assert result["statuses"] == [422] and limit in result["answer"], result
    assert result["server_cpu_s"] <= 4.0, result


def test_json_bodies_are_held_to_what_options_need(server) -> None:
    """30 MB of options-only keys: 413 before json.loads (on main: 400 after +805 MB); 50 unknown keys of
    400 kB: a 400 whose message is capped (on main it echoed every key)."""
    bench, url, rss = server
    many = bench.run_case(url, rss, bench.options_only_json(), concurrent=1, settle_s=0)
    assert many["statuses"] == [413] and "values" in many["answer"], many
    assert many["peak_growth_mb"] <= 150, many
    long_keys = bench.run_case(url, rss, bench.long_unknown_keys(), concurrent=1, settle_s=0)
    assert long_keys["statuses"] == [400] and "unknown field" in long_keys["answer"], long_keys
    answer_chars = int(long_keys["answer"].rsplit("(", 1)[1].split()[0]) if "chars)" in long_keys["answer"] else 0
    assert answer_chars < 2_000, long_keys  # the answer names 5 keys, each cut to 64 characters, and a count
