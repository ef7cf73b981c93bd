"""BentoML's workers end with their server, and a server whose workers cannot start stops, non-zero.

`bentoml serve` (the serving process, which `transfer-serve serve` becomes through `execve`) imports the service
module, then starts its HTTP workers as child processes through circus; each worker imports the module again.
Two gaps of BentoML 1.4 this module closes, relying on that process layout and on two internals read through
service/bentoml_compat.py (section 6: `in_worker()`, and `workers_are_restarted()`, whether circus restarts a
worker that exited):

1. **Workers outlive a killed server.** SIGKILL of the serving process runs no cleanup: its workers were adopted
   by PID 1 and kept answering on the port. `bind_to_server()`, at the module's import, makes each worker die with
   the serving process (`models.lifetime.die_with_parent`; the server's pid travels in `SERVER_PID_ENV`, set by the
   serving process before circus copies its environment for the workers, so a worker whose server died before it
   got this far ends at once).
2. **A worker that cannot start is restarted forever.** Circus respawns it every few seconds with a traceback,
   and `/readyz` never passes: an orchestrator sees a hang, not a crash. `counting_start()` wraps the service's
   start in a worker: after `MAX_FAILED_STARTS` consecutive failures (1 in a container, where BentoML does not
   restart workers) it SIGTERMs the serving process, which then exits with `FAILED_STARTS_EXIT_CODE` (an
   `atexit` hook registered by `bind_to_server()` in the serving process). A start that succeeds resets the count.
   The count is a file named after the serving process (pid and start time) in the temporary folder.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from models.lifetime import die_with_parent
from service.bentoml_compat import in_worker, workers_are_restarted

logger = logging.getLogger("bentoml.transfer_serve")

SERVER_PID_ENV = "_TRANSFER_SERVE_SERVER_PID"
MAX_FAILED_STARTS = 3
FAILED_STARTS_EXIT_CODE = 3


def failed_start_limit() -> int:
    return MAX_FAILED_STARTS if workers_are_restarted() else 1


def bind_to_server() -> None:
    """At the service module's import: in a worker, die with the serving process; elsewhere, be that process for
    the workers it will start (its pid for them, and the exit code their failed starts ask for)."""
    if in_worker():
        die_with_parent(int(os.environ.get(SERVER_PID_ENV) or os.getppid()))
        return
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    atexit.register(_exit_failed_when_workers_gave_up, os.getpid())


def failed_starts_file(server_pid: int) -> Path:
    import psutil

    started = int(psutil.Process(server_pid).create_time())
    return Path(tempfile.gettempdir()) / f"transfer-serve-{server_pid}-{started}.failed-starts"


@contextlib.contextmanager
def counting_start() -> Iterator[None]:
    """Wrap a worker's start: a failure is counted (and at the limit stops the server), a success resets the count.
    Outside a worker (tests, the serving process), a plain pass-through."""
    server_pid = int(os.environ.get(SERVER_PID_ENV) or 0)
    if not in_worker() or server_pid != os.getppid():
        yield
        return
    record = failed_starts_file(server_pid)
    try:
        yield
    except BaseException:
        with open(record, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        failures = len(record.read_text().splitlines())
        if failures >= failed_start_limit():
            logger.error("%d worker starts failed in a row; stopping the server (exit %d)", failures,
                         FAILED_STARTS_EXIT_CODE)  # fmt: skip
            os.kill(server_pid, signal.SIGTERM)
        raise
    record.unlink(missing_ok=True)


def _exit_failed_when_workers_gave_up(server_pid: int) -> None:
    """`atexit` hook of the serving process: exit with FAILED_STARTS_EXIT_CODE when its workers stopped it."""
    if os.getpid() != server_pid:  # a forked child inherits the hook
        return
    try:
        record = failed_starts_file(server_pid)
        failures = len(record.read_text().splitlines())
    except (OSError, ImportError):
        return
    record.unlink(missing_ok=True)
    if failures >= failed_start_limit():
        sys.stderr.write(
            f"error: the server stopped: {failures} worker start(s) failed in a row (see the log above)\n"
        )
        sys.stderr.flush()
        os._exit(FAILED_STARTS_EXIT_CODE)
