"""HTTP service speed over loopback: a bounded load generator against `transfer-serve serve` on 127.0.0.1.

    python benchmarks/serving.py --quick                 # seconds-to-a-minute: 2 configs x small load
    python benchmarks/serving.py                         # 1..64 clients, 1 and 4 JPEGs per request
    python benchmarks/serving.py --artifact DIR --device cuda
    python benchmarks/serving.py --burst                 # quiet -> burst -> quiet: does latency recover?
    python benchmarks/serving.py --photos-12mp           # 12 MP JPEGs, decode "full" (before) vs "reduced" (after)

For each server configuration (adaptive batching on: TRANSFER_SERVE_MAX_BATCH_SIZE=32; off: =1), the
generator runs C concurrent clients (asyncio + httpx, one connection each), each sending multipart
/classify requests with K real JPEG files (320x240, decoded and preprocessed by the server) back to back,
until `--requests` requests are answered or `--seconds` have passed: it stops by itself. It reports images/s,
p50/p95/p99 request latency, and the mean batch size the server ran (from BentoML's /metrics histogram
`bentoml_service_adaptive_batch_size`). Before the servers start it measures the raw runtime the server
uses (the default one, in this process, at batch 16, pre-decoded inputs) and the same runtime end to end
from JPEG bytes (decode + preprocess + inference, one thread), so the HTTP figures have their ceilings beside
them. Client and server share this machine's cores.

`--burst` runs one server (batching on) through three phases instead: 1 client sending one PNG digit at a
time (quiet), `--burst-clients` clients for `--burst-seconds` (burst), then 1 client again (quiet); it prints
images/s and p50/p99 per phase. Latency after the burst should be what it was before it (docs/SERVING.md,
"Batching").

`--photos-12mp` serves 12-megapixel JPEGs (4032x3024, ~3 MB: `common.photo_12mp_payloads`) with one
server per decode path, side by side in one run: the same artifact copied twice with its manifest's
`preprocessing.decode` set to "full" (before: every pixel decoded, then resized) and "reduced" (after: JPEG
DCT scaling to at least twice the network's input side, then resized). Beside the HTTP figures (16 clients x
1 image by default, batching on) it prints the raw runtime at `--reference-batch` (measured before and after
the servers run), the per-image decode time of each path on one thread (without `--quick`, also of each JPEG
DCT scale), and the CPU seconds per image the server processes and the load generator used. `--quick` uses 2 distinct photos and 6 requests per server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DCT_HEADERS, DECODE_HEADERS, cpu_per_call, cpu_seconds, dct_scale_rows, decode_rows, export_model, jpeg_payloads, machine, percentile, photo_12mp_payloads,
    photo_12mp_source, table, timed, with_decode,
)

from service.launch import local_server  # noqa: E402


def batch_histogram(url: str, method: str = "classify") -> tuple[float, float]:
    """(sum, count) of the server's adaptive batch size histogram for `method` (0, 0 before any batch)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for kind in ("sum", "count"):
        pattern = rf'^bentoml_service_adaptive_batch_size_{kind}\{{[^}}]*method_name="{method}"[^}}]*\}} ([0-9.e+]+)'
        found[kind] = sum(float(v) for v in re.findall(pattern, text, flags=re.M))
    return found["sum"], found["count"]


async def load(url: str, payloads: list[bytes], clients: int, per_request: int, requests: int, seconds: float):
    """Closed loop: `clients` coroutines send back to back until `requests` are answered or `seconds` pass."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            number = issued
            issued += 1
            files = [("images", (f"{number}_{i}.jpg", payloads[(number * per_request + i) % len(payloads)], "image/jpeg"))
                     for i in range(per_request)]
            started = time.perf_counter()
            try:
                response = await http.post("/classify", files=files)
                ok = response.status_code == 200
                if not ok:
                    errors.append(f"{response.status_code} {response.text[:100]}")
            except httpx.HTTPError as exc:
                ok = False
                errors.append(f"{type(exc).__name__}: {exc}")
            if ok:
                latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await http.post("/classify", files=[("images", ("w.jpg", payloads[0], "image/jpeg"))])  # open a connection
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - started
    return latencies, errors, wall


def digit_pngs(count: int = 64) -> list[bytes]:
    """`count` of scikit-learn's 8x8 digits as grayscale PNGs (what the issue's client sent)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[:count] / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
    payloads = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, "PNG")
        payloads.append(buffer.getvalue())
    return payloads


def phase_row(name: str, clients: int, latencies: list[float], errors: list[str], wall: float) -> list[object]:
    return [name, clients, len(latencies), f"{len(latencies) / wall:.1f}", f"{percentile(latencies, 50) * 1e3:.0f}",
            f"{percentile(latencies, 99) * 1e3:.0f}", len(errors)]


BURST_HEADERS = ["phase", "clients", "requests", "images/s", "p50 ms", "p99 ms", "errors"]


def quiet_burst_quiet(url: str, payloads: list[bytes], quiet_requests: int = 200, quiet_seconds: float = 15.0,
                      burst_clients: int = 16, burst_seconds: float = 10.0) -> dict[str, tuple[list[float], list[str], float]]:
    """1 client (one image per request) -> `burst_clients` clients for `burst_seconds` -> 1 client again, back to
    back on the same server. Returns (latencies, errors, wall seconds) per phase: quiet, burst, quiet after."""
    phases = {}
    phases["quiet"] = asyncio.run(load(url, payloads, 1, 1, quiet_requests, quiet_seconds))
    phases["burst"] = asyncio.run(load(url, payloads, burst_clients, 1, 10**9, burst_seconds))
    phases["quiet after"] = asyncio.run(load(url, payloads, 1, 1, quiet_requests, quiet_seconds))
    return phases


def burst_main(args: argparse.Namespace, artifact: Path, scratch: Path) -> list[list[object]]:
    settings = {"TRANSFER_SERVE_DEVICE": args.device, **dict(s.split("=", 1) for s in args.server_env)}
    home = scratch / "home-burst"
    home.mkdir()
    with local_server(artifact, home, **settings) as url:
        phases = quiet_burst_quiet(url, digit_pngs(), args.requests, args.seconds, args.burst_clients,
                                   args.burst_seconds)
    clients = {"quiet": 1, "burst": args.burst_clients, "quiet after": 1}
    rows = [phase_row(name, clients[name], *result) for name, result in phases.items()]
    print(f"# server settings: {settings}")
    print(table(BURST_HEADERS, rows))
    return rows


PHOTO_HEADERS = ["decode", "clients", "requests", "images/s", "% of raw", "p50 ms", "p95 ms", "p99 ms", "mean batch",
                 "server CPU ms/image", "client CPU ms/image", "errors"]


def raw_images_per_s(artifact: Path, device: str, batch_size: int, min_seconds: float) -> tuple[float, float]:
    """The server's default runtime in this process at `batch_size`, pre-decoded inputs: (images/s, CPU seconds per image)."""
    from models.inference import InferenceOptions
    from models.predictor import Predictor

    predictor = Predictor.from_artifact(artifact, InferenceOptions(device=device))
    size = predictor.manifest.preprocessing.image_size
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
    wall, cpu = cpu_per_call(lambda: predictor.predict_batch(batch), 3, min_seconds)
    return batch_size / wall, cpu / batch_size


def photos_main(args: argparse.Namespace, artifact: Path, scratch: Path) -> list[list[object]]:
    """12 MP JPEGs through one server per decode path (before: "full", after: "reduced"), same artifact."""
    payloads = photo_12mp_payloads(args.photos)
    print(f"# {len(payloads)} distinct 12 MP JPEGs ({photo_12mp_source()}), "
          f"{np.mean([len(p) for p in payloads]) / 1e6:.1f} MB mean", flush=True)
    paths = {"full (before)": with_decode(artifact, "full", scratch / "before"),
             "reduced (after)": with_decode(artifact, "reduced", scratch / "after")}
    min_seconds = 1.0 if args.quick else 5.0
    raw = [raw_images_per_s(artifact, args.device, args.reference_batch, min_seconds)]
    print(table(DECODE_HEADERS, decode_rows(payloads, paths, 0.5 if args.quick else 3.0)), flush=True)
    if not args.quick:
        print(table(DCT_HEADERS, dct_scale_rows(payloads, 3.0)), flush=True)
    order = list(paths)
    rows = []
    for round_ in range(args.rounds):
        for label in order if round_ % 2 == 0 else order[::-1]:  # before, after; then after, before; ...
            home = scratch / f"home-{len(rows)}"
            home.mkdir()
            settings = {"TRANSFER_SERVE_MAX_BATCH_SIZE": str(args.batch_sizes[0]), "TRANSFER_SERVE_MAX_LATENCY_MS": "60000",
                        "TRANSFER_SERVE_DEVICE": args.device}
            with local_server(paths[label], home, **settings) as url:
                for clients in args.clients:
                    before, cpu_before = batch_histogram(url), cpu_seconds()
                    latencies, errors, wall = asyncio.run(load(url, payloads, clients, 1, args.requests, args.seconds))
                    after, cpu_after = batch_histogram(url), cpu_seconds()
                    batches = after[1] - before[1]
                    done = max(len(latencies), 1)
                    rows.append([label, clients, len(latencies), len(latencies) / wall, percentile(latencies, 50) * 1e3,
                                 percentile(latencies, 95) * 1e3, percentile(latencies, 99) * 1e3,
                                 (after[0] - before[0]) / batches if batches else 1.0,
                                 (cpu_after[1] - cpu_before[1]) / done * 1e3, (cpu_after[0] - cpu_before[0]) / done * 1e3,
                                 len(errors)])
                    print(f"# {label}, {clients} clients: {len(latencies)} requests, {len(latencies) / wall:.1f} images/s",
                          file=sys.stderr, flush=True)
                    if errors:
                        print(f"# first error: {errors[0]}", file=sys.stderr)
    raw.append(raw_images_per_s(artifact, args.device, args.reference_batch, min_seconds))
    reference = float(np.mean([r[0] for r in raw]))
    print(f"raw runtime at batch {args.reference_batch}, pre-decoded: {raw[0][0]:.1f} images/s before the servers, "
          f"{raw[1][0]:.1f} after (mean {reference:.1f}); CPU ms/image "
          f"{raw[0][1] * 1e3:.1f} and {raw[1][1] * 1e3:.1f}; {machine(args.device)}")
    formatted = [[label, clients, count, f"{rate:.1f}", f"{100 * rate / reference:.0f}%", f"{p50:.0f}", f"{p95:.0f}",
                  f"{p99:.0f}", f"{batch:.1f}", f"{server:.0f}", f"{client:.0f}", errors]
                 for label, clients, count, rate, p50, p95, p99, batch, server, client, errors in rows]
    print(table(PHOTO_HEADERS, formatted))
    return formatted


def raw_reference(artifact: Path, payloads: list[bytes], device: str, batch_size: int, min_seconds: float) -> list[list[object]]:
    """The server's default runtime in this process at `batch_size`: raw (pre-decoded) and end to end from JPEG bytes."""
    from models.inference import InferenceOptions
    from models.predictor import Predictor
    from models.decoding import load_image

    predictor = Predictor.from_artifact(artifact, InferenceOptions(device=device))
    chosen = [payloads[i % len(payloads)] for i in range(batch_size)]

    def decoded() -> list:
        return [load_image(p, preprocessing=predictor.manifest.preprocessing) for p in chosen]

    batch = predictor.preprocess(decoded())
    raw = timed(lambda: predictor.predict_batch(batch), 3, min_seconds)
    decode = timed(lambda: predictor.preprocess(decoded()), 3, min_seconds)
    e2e = timed(lambda: predictor.predict(decoded()), 3, min_seconds)
    name = predictor.runtime.describe()["runtime"]
    return [
        [f"raw {name}", batch_size, f"{batch_size / np.mean(raw):.1f}", f"{np.median(raw) * 1e3:.0f}"],
        ["decode + preprocess only (1 thread)", batch_size, f"{batch_size / np.mean(decode):.1f}", f"{np.median(decode) * 1e3:.0f}"],
        [f"decode + preprocess + {name} (1 thread)", batch_size, f"{batch_size / np.mean(e2e):.1f}", f"{np.median(e2e) * 1e3:.0f}"],
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, 1 and 2 images, 12 requests each.")
    parser.add_argument("--artifact", type=Path, default=None, help="default: efficientnet_lite0 (ImageNet) exported here")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="exported when no --artifact is given")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--images-per-request", type=int, nargs="+", default=None)
    parser.add_argument("--requests", type=int, default=None, help="most requests per scenario")
    parser.add_argument("--seconds", type=float, default=None, help="most seconds per scenario")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1], help="server max batch sizes (1 = off)")
    parser.add_argument("--reference-batch", type=int, default=16)
    parser.add_argument("--burst", action="store_true", help="quiet -> burst -> quiet scenario (one server)")
    parser.add_argument("--burst-clients", type=int, default=16)
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--photos-12mp", action="store_true",
                        help="12 MP JPEGs, decode full (before) vs reduced (after), one server each")
    parser.add_argument("--photos", type=int, default=None, help="distinct 12 MP JPEGs (default 8; --quick 2)")
    parser.add_argument("--rounds", type=int, default=1, help="--photos-12mp: before/after pairs, order alternated")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="VAR=VALUE",
                        help="extra server settings for --burst, e.g. TRANSFER_SERVE_MAX_BATCH_WAIT_MS=0")
    args = parser.parse_args(argv)
    if args.photos_12mp:
        args.clients = args.clients or [16]
        args.photos = args.photos or (2 if args.quick else 8)
        args.requests = args.requests or (6 if args.quick else 400)
    args.clients = args.clients or ([1, 4] if args.quick else [1, 4, 16, 64])
    args.images_per_request = args.images_per_request or ([1, 2] if args.quick else [1, 4])
    if args.burst:  # per quiet phase
        args.requests = args.requests or 300
        args.seconds = args.seconds or 20.0
    args.requests = args.requests or (12 if args.quick else 400)
    args.seconds = args.seconds or (20.0 if args.quick else 30.0)
    return args


def main(argv: list[str] | None = None) -> list[list[object]]:
    args = parse_args(argv)
    print(f"# service benchmark, {args.device}; {machine(args.device)}")
    payloads = jpeg_payloads(64)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="service-bench-") as scratch:
        scratch = Path(scratch)
        weights = "imagenet" if args.backbone == "efficientnet_lite0" else "none"
        artifact = args.artifact or export_model(scratch, args.backbone, weights)
        if args.burst:
            return burst_main(args, artifact, scratch)
        if args.photos_12mp:
            return photos_main(args, artifact, scratch)
        reference = raw_reference(artifact, payloads, args.device, args.reference_batch, 1.0 if args.quick else 5.0)
        print(table(["in-process reference", "batch", "images/s", "p50 ms"], reference), flush=True)
        for max_batch in args.batch_sizes:
            label = "off (max batch 1)" if max_batch == 1 else f"on (max batch {max_batch})"
            home = scratch / f"home-{max_batch}"
            home.mkdir()
            settings = {"TRANSFER_SERVE_MAX_BATCH_SIZE": str(max_batch), "TRANSFER_SERVE_MAX_LATENCY_MS": "60000",
                        "TRANSFER_SERVE_DEVICE": args.device}
            with local_server(artifact, home, **settings) as url:
                for per_request in args.images_per_request:
                    for clients in args.clients:
                        before = batch_histogram(url)
                        latencies, errors, wall = asyncio.run(
                            load(url, payloads, clients, per_request, args.requests, args.seconds))
                        after = batch_histogram(url)
                        batches = after[1] - before[1]
                        mean_batch = (after[0] - before[0]) / batches if batches else float(per_request)  # off: one request per pass
                        row = [label, clients, per_request, len(latencies), f"{len(latencies) * per_request / wall:.1f}",
                               f"{percentile(latencies, 50) * 1e3:.0f}", f"{percentile(latencies, 95) * 1e3:.0f}",
                               f"{percentile(latencies, 99) * 1e3:.0f}", f"{mean_batch:.1f}", len(errors)]
                        rows.append(row)
                        print("| " + " | ".join(str(c) for c in row) + " |", file=sys.stderr, flush=True)
                        if errors:
                            print(f"# first error: {errors[0]}", file=sys.stderr)
    print(table(["batching", "clients", "images/request", "requests", "images/s", "p50 ms", "p95 ms", "p99 ms",
                 "mean batch", "errors"], rows))
    return rows


if __name__ == "__main__":
    main()
