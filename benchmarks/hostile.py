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

Issue 21 (shapes and modes that defeated the decode budget, inputs that cost CPU, answers that amplify):

  w1 16 very wide 1-bit PNGs (65,535 x 610 = 40 MP), one /embed       w2 16 very wide greyscale PNGs
  w3 6 very wide JPEGs                                                 w4 8 very wide palette GIFs with transparency
  w5 8 very wide 16-bit TIFFs (deflate)                                w6 4 requests of 4 wide 1-bit PNGs at once
  w7 a mix (1-bit, L, JPEG, GIF, TIFF, RGBA PNG, WebP, all wide)
  j1 a 30 MB JSON body of options-only keys (/embed)                   j2 50 unknown keys of 400 kB each (20 MB)
  p1 a progressive JPEG repeating a scan 3,000 times                   p2 a TIFF declaring 2,000,000 strips
  p3 a PNG with 1,000,000 private chunks                               p4 30 MB of PPM whitespace
  l  a light client's p50 (one 224 px JPEG) alone, then while 4 clients send case p3 in a loop

Each case also reports the CPU seconds the server's process tree spent on it (psutil, user + system).

and the truncated JPEG alone, with and without a trailing EOI marker, to see what it is answered.
Every request is bounded: one connection per request, a 120 s client timeout, a fixed number of requests.
"""

from __future__ import annotations

import argparse
import base64
import functools
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


def wide_image(mode: str, width: int = 65_535, height: int = 610):
    """A very wide image of `mode` (short side 610, under what the reduction needs): 64 px checks, which every
    format compresses to a small file."""
    from PIL import Image

    x = np.arange(width, dtype=np.uint32)[None, :] // 64
    y = np.arange(height, dtype=np.uint32)[:, None] // 64
    checks = (x + y) % 2
    grey = Image.fromarray((checks * 200 + 20).astype(np.uint8), "L")
    if mode == "I;16":
        return Image.fromarray((checks * 50_000 + 1_000).astype(np.uint16))
    if mode in ("1", "L"):
        return grey.convert(mode)
    if mode == "P":
        return grey.quantize(16)
    if mode == "RGBA":
        return Image.merge("RGBA", [grey] * 4)
    return grey.convert(mode)


def encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


MIX = ("1-bit PNG", "L PNG", "RGBA PNG", "JPEG", "GIF", "16-bit TIFF", "WebP")


@functools.lru_cache(maxsize=None)
def wide_payloads(kind: str) -> bytes:
    """One very wide image of each class issue 21 found."""
    if kind == "1-bit PNG":
        return encoded(wide_image("1"), "PNG")
    if kind == "L PNG":
        return encoded(wide_image("L"), "PNG")
    if kind == "JPEG":
        return encoded(wide_image("RGB", 65_500), "JPEG", quality=80)  # JPEG's widest side is 65,500
    if kind == "GIF":
        return encoded(wide_image("P"), "GIF", transparency=0)
    if kind == "16-bit TIFF":
        return encoded(wide_image("I;16"), "TIFF", compression="tiff_deflate")
    if kind == "RGBA PNG":
        return encoded(wide_image("RGBA"), "PNG")
    if kind == "WebP":
        return encoded(wide_image("RGB", 16_383, 900), "WEBP", quality=20, method=0)  # WebP: 16,383 px at most
    raise ValueError(kind)


def many_scan_jpeg(scans: int = 3000, side: int = 2000) -> bytes:
    """A progressive JPEG whose last scan is repeated: libjpeg decodes every repeat (a warning, no error)."""
    from PIL import Image

    data = encoded(Image.new("RGB", (side, side), (90, 120, 200)), "JPEG", quality=70, progressive=True)  # tiny scans
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def many_strip_tiff(strips: int = 2_000_000, width: int = 2) -> bytes:
    """An uncompressed grey TIFF of `strips` one-row strips (all pointing at the same row)."""
    entries = 9
    offsets_at = 8 + 2 + 12 * entries + 4
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    tags = [(256, 4, 1, width), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, strips, offsets_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, counts_at)]
    ifd = struct.pack("<H", entries) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", data_at) * strips
            + struct.pack("<I", width) * strips + b"\x80" * width)


def many_chunk_png(chunks: int = 1_000_000) -> bytes:
    """An 8x8 grey PNG with `chunks` empty private chunks before its pixels (Pillow reads each in Python)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"prVt", b"") * chunks
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 72)) + _png_chunk(b"IEND", b""))


def whitespace_ppm(size: int = 30_000_000) -> bytes:
    return b"P6" + b" " * size + b"8 8 255\n" + b"\x00" * 192


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


def post_embed(url: str, payloads: list[bytes] | "JSONBody", name: str) -> tuple[int, str]:
    with httpx.Client(timeout=120) as client:
        if isinstance(payloads, JSONBody):
            response = client.post(f"{url}/embed", content=payloads.body, headers={"content-type": "application/json"})
        else:
            files = [("images", (f"{name}_{i}", data, "application/octet-stream")) for i, data in enumerate(payloads)]
            response = client.post(f"{url}/embed", files=files)
    text = response.text
    return response.status_code, text[:160] + (f" ... ({len(text)} chars)" if len(text) > 160 else "")


class JSONBody:
    """A raw JSON request body (sent as it is, not as multipart files)."""

    def __init__(self, body: bytes) -> None:
        self.body = body


def options_only_json(size: int = 30_000_000) -> JSONBody:
    keys, total, i = [], 0, 0
    while total < size:
        key = f'"k{i:08d}":0'
        keys.append(key)
        total += len(key) + 1
        i += 1
    return JSONBody(b'{"images":["AAAA"],' + ",".join(keys).encode() + b"}")


def long_unknown_keys(count: int = 50, key_bytes: int = 400_000) -> JSONBody:
    png = base64.b64encode(encoded(wide_image("RGB", 64, 64), "PNG")).decode()
    fields = ",".join(f'"{chr(97 + i % 26) * key_bytes}{i}":1' for i in range(count))
    return JSONBody(f'{{"images":["{png}"],{fields}}}'.encode())


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root] + root.children(recursive=True):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def run_case(url: str, rss: TreeRSS, payloads, concurrent: int = 1, settle_s: float = SETTLE_S) -> dict:
    """Send `concurrent` identical requests at once; baseline, peak growth and kept growth in MB, server CPU s."""
    time.sleep(0.5)
    baseline = rss.reset_peak()
    cpu_before = tree_cpu_s(rss.root.pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        answers = list(pool.map(lambda i: post_embed(url, payloads, f"r{i}"), range(concurrent)))
    seconds = time.perf_counter() - started
    cpu_s = tree_cpu_s(rss.root.pid) - cpu_before
    peak = rss.peak_since_reset()
    time.sleep(settle_s)
    kept = rss.current()
    return {
        "statuses": sorted({status for status, _ in answers}),
        "answer": answers[0][1],
        "seconds": round(seconds, 2),
        "server_cpu_s": round(cpu_s, 2),
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
    "w1": ("16 x 65535x610 1-bit PNG, one /embed", lambda: ([wide_payloads("1-bit PNG")] * 16, 1)),
    "w2": ("16 x 65535x610 greyscale PNG, one /embed", lambda: ([wide_payloads("L PNG")] * 16, 1)),
    "w3": ("6 x 65500x610 JPEG, one /embed", lambda: ([wide_payloads("JPEG")] * 6, 1)),
    "w4": ("8 x 65535x610 palette GIF with transparency, one /embed", lambda: ([wide_payloads("GIF")] * 8, 1)),
    "w5": ("8 x 65535x610 16-bit TIFF (deflate), one /embed", lambda: ([wide_payloads("16-bit TIFF")] * 8, 1)),
    "w6": ("4 x 65535x610 1-bit PNG, 4 requests at once", lambda: ([wide_payloads("1-bit PNG")] * 4, 4)),
    "w7": ("a mix: 1-bit, L, RGBA PNG, JPEG, GIF, 16-bit TIFF (65535x610), WebP (16383x900)",
           lambda: ([wide_payloads(k) for k in MIX], 1)),
    "j1": ("30 MB JSON body of options-only keys", lambda: (options_only_json(), 1)),
    "j2": ("JSON body with 50 unknown keys of 400 kB each (20 MB)", lambda: (long_unknown_keys(), 1)),
    "p1": ("progressive JPEG, 2000x2000, its last scan repeated to 3,000 scans", lambda: ([many_scan_jpeg()], 1)),
    "p2": ("TIFF declaring 2,000,000 one-row strips (16 MB)", lambda: ([many_strip_tiff()], 1)),
    "p3": ("8x8 PNG with 1,000,000 private chunks (12 MB)", lambda: ([many_chunk_png()], 1)),
    "p4": ("30 MB of PPM whitespace", lambda: ([whitespace_ppm()], 1)),
}
QUICK_CASES = ["a", "b2", "c", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "j1", "j2", "p1", "p2", "p3", "p4"]


def light_client_p50(url: str, hostile: list[bytes] | None, requests: int = 20, hostile_clients: int = 4) -> dict:
    """p50 (and max) latency of a light client sending one 224 px JPEG, alone or while `hostile_clients` send
    `hostile` in a loop."""
    light = [encoded(wide_image("RGB", 224, 224), "JPEG", quality=85)]
    stop = threading.Event()

    def hostile_loop() -> None:
        while not stop.is_set():
            post_embed(url, hostile, "h")

    threads = [threading.Thread(target=hostile_loop, daemon=True) for _ in range(hostile_clients if hostile else 0)]
    for thread in threads:
        thread.start()
    time.sleep(1.0 if hostile else 0)
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        post_embed(url, light, "light")
        latencies.append(time.perf_counter() - started)
    stop.set()
    for thread in threads:
        thread.join(timeout=130)
    return {"p50_ms": round(1000 * float(np.median(latencies))), "max_ms": round(1000 * max(latencies))}


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
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES) + ["l"])
    parser.add_argument("--quick", action="store_true", help=f"cases {' '.join(QUICK_CASES)} and l only")
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
                for name in QUICK_CASES if args.quick else [c for c in args.cases if c != "l"]:
                    title, build = CASES[name]
                    payloads, concurrent = build()
                    results[name] = run_case(url, rss, payloads, concurrent, args.settle) | {"title": title}
                    print(f"{name}: {results[name]}", flush=True)
                if args.quick or "l" in args.cases:
                    alone, loaded = light_client_p50(url, None), light_client_p50(url, [many_chunk_png()])
                    results["l"] = {"alone": alone, "with 4 hostile clients": loaded}
                    print(f"l: {results['l']}", flush=True)
                answers = truncated_answers(url)
    rows = [[name, r["title"], ",".join(map(str, r["statuses"])), r["seconds"], r["server_cpu_s"], r["baseline_mb"],
             r["peak_growth_mb"], r["kept_growth_mb"]] for name, r in results.items() if name != "l"]
    print(f"\n{machine()}\n")
    print(table(["case", "request", "HTTP", "s", "server CPU s", "baseline MB", "peak growth MB",
                 f"kept after {args.settle:.0f} s MB"], rows))
    print()
    print(table(["input", "HTTP", "answer"], answers))
    results["truncated"] = {"rows": answers}
    return results


if __name__ == "__main__":
    main()
