"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis, bounded examples).

Every operation the server documents at /docs.json gets `FUZZ_EXAMPLES` generated requests (valid and
schema-violating); none may answer 5xx, every 4xx must be the documented `{"error": "..."}` JSON, and the
server must still answer a real image afterwards."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("TRANSFER_SERVE_FUZZ_EXAMPLES", "40"))
SENT: Counter[str] = Counter()


def check_answer(label: str, status: int, content_type: str, content: bytes) -> None:
    assert status < 500, f"{label}: {status} {content[:500]!r}"
    if status >= 400:
        assert content_type.startswith("application/json"), (label, status, content[:300])
        body = json.loads(content)
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], (label, body)


def test_every_documented_operation_survives_generated_requests(reliability_server, digits_dir):
    base_url = str(reliability_server.base_url).rstrip("/")
    schema = schemathesis.openapi.from_url(f"{base_url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /classify", "POST /embed", "POST /metadata"} <= labels, labels

    for operation in operations:

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            response = case.call(base_url=base_url, timeout=60)
            SENT[operation.label] += 1
            content_type = {k.lower(): v for k, v in response.headers.items()}.get("content-type", [""])
            content_type = content_type[0] if isinstance(content_type, list) else content_type
            check_answer(operation.label, response.status_code, content_type, response.content)

        fuzz()

    image = sorted((digits_dir / "0").glob("*.png"))[0].read_bytes()
    after = reliability_server.post("/classify", files=[("images", ("a.png", image, "image/png"))])
    assert after.status_code == 200, after.text
    print(f"\nfuzzed {sum(SENT.values())} requests over {len(SENT)} operations: {dict(SENT)}")
    assert all(SENT[label] >= 1 for label in labels)
