"""Memory a hostile (but within-limits) request makes the server hold: peak RSS growth and what is kept.

    python benchmarks/hostile.py                    # efficientnet_lite0 (no weights) exported here, default limits
    python benchmarks/hostile.py --artifact DIR     # serve DIR instead
    python benchmarks/hostile.py --cases a c        # only some cases

Starts `transfer-serve serve` on 127.0.0.1 with DEFAULT limits, samples the RSS of the server's whole process
tree every 50 ms (psutil, in a thread), and for each case prints the baseline just before it, the peak growth
while it runs, and the growth kept 5 s after its answers. Cases:

  a  32 x a 1 kB JPEG whose header declares 6000x6000 (36 MP, under the 40 MP limit): 400 bytes of scan data
     and an EOI marker (libjpeg decodes it, padding the missing data with grey), one /embed
  b  32 x a 6000x6000 16-bit grayscale PNG (~100 kB each) in one /embed (the per-request decode budget decides)
  b2 as many of those PNGs as the per-request decode budget admits, in one /embed
  c  4 requests of case a at once
  c2 4 requests of case b2 at once
  d  8 phone-size (4032x3024) photo-like JPEGs in one /embed

and the truncated JPEG alone, with and without a trailing EOI marker, to see what it is answered.
Every request is bounded: one connection per request, a 120 s client timeout, a fixed number of requests.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import export_model, machine, table  # noqa: E402

from service.launch import local_server  # noqa: E402

MB = 1024 * 1024
SETTLE_S = 5.0


# --- payloads ---------------------------------------------------------------------------------------------


def truncated_jpeg(width: int = 6000, height: int = 6000, scan_bytes: int = 400, eoi: bool = False) -> bytes:
    """A baseline JPEG header declaring `width` x `height` followed by only `scan_bytes` of (real) entropy-coded
    data: a few hundred bytes that libjpeg decodes as a full-size image, the missing data padded with grey."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=75)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)  # SOF0: length(2) precision(1) height width
    sos = data.index(b"\xff\xda")
    scan_start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return bytes(data[: scan_start + scan_bytes]) + (b"\xff\xd9" if eoi else b"")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def sixteen_bit_png(width: int = 6000, height: int = 6000) -> bytes:
    """A valid 16-bit grayscale PNG of `width` x `height` (four grey bands above 8 bits), ~100 kB at 6000x6000;
    built row by row, never holding the raw pixels."""
    samples = np.repeat(np.array([9000, 30000, 45000, 60000], dtype=">u2"), -(-width // 4))[:width]
    row = b"\x00" + samples.tobytes()  # filter type 0 + big-endian samples
    compressor = zlib.compressobj(9)
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", compressed) + _png_chunk(b"IEND", b"")


def phone_jpegs(count: int, width: int = 4032, height: int = 3024, seed: int = 0) -> list[bytes]:
    """`count` photo-like JPEGs (smooth colour fields, edges and sensor-like noise), quality 85, ~1-3 MB each."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
        pixels = np.asarray(image, dtype=np.int16)
        pixels = pixels + rng.integers(-6, 7, size=pixels.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=85)
        payloads.append(buffer.getvalue())
    return payloads


# --- measuring ------------------------------------------------------------------------------------------------


class TreeRSS:
    """Samples the summed RSS of a process and all its descendants every `interval_s`, in a daemon thread."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        import psutil

        total = 0
        try:
            family = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        for process in family:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self.stop.is_set():
            value = self.current()
            with self.lock:
                self.peak = max(self.peak, value)
            self.stop.wait(self.interval_s)

    def __enter__(self) -> "TreeRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def reset_peak(self) -> int:
        """Start a new peak window; returns the RSS now (the baseline of what follows)."""
        value = self.current()
        with self.lock:
            self.peak = value
        return value

    def peak_since_reset(self) -> int:
        with self.lock:
            return max(self.peak, self.current())


def server_pid(url: str) -> int:
    """The pid of the process listening on `url`'s port, walked up to the root of the server's tree (the
    `transfer-serve serve` process `local_server` started, which exec'd into `bentoml serve`)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN and connection.pid:
            process = psutil.Process(connection.pid)
            while process.parent() is not None and "bentoml" in " ".join(process.parent().cmdline()):
                process = process.parent()
            return process.pid
    raise RuntimeError(f"no process listens on {url}")


def post_embed(url: str, payloads: list[bytes], name: str) -> tuple[int, str]:
    files = [("images", (f"{name}_{i}", data, "application/octet-stream")) for i, data in enumerate(payloads)]
    with httpx.Client(timeout=120) as client:
        response = client.post(f"{url}/embed", files=files)
    return response.status_code, response.text[:160]


def run_case(url: str, rss: TreeRSS, payloads: list[bytes], concurrent: int = 1, settle_s: float = SETTLE_S) -> dict:
    """Send `concurrent` identical requests at once; baseline, peak growth and kept growth in MB."""
    time.sleep(0.5)
    baseline = rss.reset_peak()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        answers = list(pool.map(lambda i: post_embed(url, payloads, f"r{i}"), range(concurrent)))
    seconds = time.perf_counter() - started
    peak = rss.peak_since_reset()
    time.sleep(settle_s)
    kept = rss.current()
    return {
        "statuses": sorted({status for status, _ in answers}),
        "answer": answers[0][1],
        "seconds": round(seconds, 2),
        "baseline_mb": round(baseline / MB),
        "peak_growth_mb": round((peak - baseline) / MB),
        "kept_growth_mb": round((kept - baseline) / MB),
    }


CASES = {
    "a": ("32 x 6000x6000 truncated JPEG + EOI (1 kB each), one /embed", lambda: ([truncated_jpeg(eoi=True)] * 32, 1)),
    "b": ("32 x 6000x6000 16-bit grey PNG (~100 kB each), one /embed", lambda: ([sixteen_bit_png()] * 32, 1)),
    "b2": ("14 x 6000x6000 16-bit grey PNG (fits the 1 GiB decode budget), one /embed", lambda: ([sixteen_bit_png()] * 14, 1)),
    "c": ("case a x 4 requests at once", lambda: ([truncated_jpeg(eoi=True)] * 32, 4)),
    "c2": ("case b2 x 4 requests at once", lambda: ([sixteen_bit_png()] * 14, 4)),
    "d": ("8 x 4032x3024 photo-like JPEG, one /embed", lambda: (phone_jpegs(8), 1)),
}


def truncated_answers(url: str) -> list[list[object]]:
    rows = []
    for eoi in (False, True):
        data = truncated_jpeg(eoi=eoi)
        status, text = post_embed(url, [data], "truncated")
        rows.append([f"truncated JPEG 6000x6000, {len(data)} bytes, {'with' if eoi else 'without'} EOI", status, text[:100]])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=None, help="default: efficientnet_lite0 (no weights) exported here")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="seconds after a case before 'kept' is read")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, **server_settings: str) -> dict[str, dict]:
    args = parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        artifact = args.artifact or export_model(scratch, args.backbone, "none")
        home = scratch / "home"
        home.mkdir()
        with local_server(artifact, home, **server_settings) as url:
            pid = server_pid(url)
            with TreeRSS(pid) as rss:
                for name in args.cases:
                    title, build = CASES[name]
                    payloads, concurrent = build()
                    results[name] = run_case(url, rss, payloads, concurrent, args.settle) | {"title": title}
                    print(f"{name}: {results[name]}", flush=True)
                answers = truncated_answers(url)
    rows = [[name, r["title"], ",".join(map(str, r["statuses"])), r["seconds"], r["baseline_mb"], r["peak_growth_mb"],
             r["kept_growth_mb"]] for name, r in results.items()]
    print(f"\n{machine()}\n")
    print(table(["case", "request", "HTTP", "s", "baseline MB", "peak growth MB", f"kept after {args.settle:.0f} s MB"], rows))
    print()
    print(table(["input", "HTTP", "answer"], answers))
    results["truncated"] = {"rows": answers}
    return results


if __name__ == "__main__":
    main()
