"""Starting the HTTP server as a process of its own: what `transfer-serve serve ARTIFACT` runs.

The server is BentoML's (`bentoml serve service.service:TransferServe`); it reads its configuration from
`TRANSFER_SERVE_*` variables in every worker, so the settings travel in the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

from service.settings import ENV_PREFIX, ServiceSettings

SERVICE_IMPORT = "service.service:TransferServe"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def server_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT,
        "--host", host, "--port", str(port), "--working-dir", str(PROJECT_ROOT),
    ]  # fmt: skip


def server_env(settings: ServiceSettings, base: Mapping[str, str]) -> dict[str, str]:
    """`base` with its `TRANSFER_SERVE_*` variables replaced by those that reproduce `settings`.
    BentoML's usage tracking is off unless `base` turns it on (the server may have no internet)."""
    env = {key: value for key, value in base.items() if not key.startswith(ENV_PREFIX)}
    env.update(settings.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    return env
