"""The settings baked into the Bento this code runs from, for `bentoml serve transfer-serve:<version>`.

`bentoml build` records the service's `envs` (every TRANSFER_SERVE_* variable set at build time, among them
TRANSFER_SERVE_MODEL) in the Bento's bento.yaml. A container gets them as its environment; but `bentoml serve
<bento tag>` on the build machine imports the service from the Bento's `src/` without them (BentoML 1.4 takes
the variables it hands its workers from the imported service object, whose `envs` were computed from the
serving process's environment), so the service would find no model to serve. `baked_envs` reads them from
the bento.yaml beside the `src/` folder the service was imported from; the process environment still wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("bentoml.transfer_serve")


def bento_dir(module_file: str | Path) -> Path | None:
    """The Bento a module of `<bento>/src/<package>/<module>.py` belongs to; None outside a Bento."""
    source = Path(module_file).resolve().parent.parent
    if source.name == "src" and (source.parent / "bento.yaml").is_file():
        return source.parent
    return None


def baked_envs(module_file: str | Path, prefix: str = "TRANSFER_SERVE_") -> dict[str, str]:
    """The `prefix` variables (runtime stage) recorded in the enclosing Bento's bento.yaml; {} outside a Bento."""
    directory = bento_dir(module_file)
    if directory is None:
        return {}
    import bentoml

    envs = {
        env.name: env.value
        for env in bentoml.Bento.from_path(str(directory)).info.envs
        if env.name.startswith(prefix) and env.stage != "build"
    }
    logger.debug("settings baked into the Bento at %s: %s", directory, envs)
    return envs
