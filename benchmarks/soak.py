"""A longer soak than the test's: start the real server on loopback and print the figures.

    python benchmarks/soak.py ARTIFACT_DIR [--requests 10000] [--minutes 20] [--threads 4]

Uses the same server settings and request mix as tests/test_reliability_soak.py (`benchmarks/soak_load.py`:
every tenth request a bad image that must get its 422); exits 1 if any request failed."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak_load import SERVER_ENV, server_client, soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, server_client(args.artifact, Path(home), **SERVER_ENV) as client:
        result = soak(client, args.requests, args.minutes * 60, args.threads)
    print(result.summary())
    for failure in result.failures[:20]:
        print("FAILED", failure)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
