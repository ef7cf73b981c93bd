"""Helper processes that end with the process they serve, even when that one is killed with SIGKILL.

SIGKILL runs no cleanup: a process's children are adopted by PID 1 and keep running (holding memory, a port,
answering requests). Two tools, for the two shapes of process tree this product starts:

- `die_with_parent(parent_pid)`, called inside a child we start ourselves or whose code we run (the extraction
  job's decoding workers, BentoML's HTTP workers): the kernel sends the child SIGKILL when its parent dies
  (Linux `prctl(PR_SET_PDEATHSIG)`), and a watchdog thread does the same everywhere once the parent pid changes.
- `reap_descendants_when_gone(pid)`, for trees started by a library whose children we cannot instrument (a local
  Ray: GCS, raylet, dashboard and runtime-env agents): a small watcher process notes `pid`'s descendants while it
  lives and SIGKILLs the last ones it saw, and their children, as soon as `pid` is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

PARENT_CHECK_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) as soon as `parent_pid`, its parent, dies; at once when it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        threading.Event().wait(PARENT_CHECK_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def reap_descendants_when_gone(pid: int) -> subprocess.Popen:
    """Start a watcher process that SIGKILLs `pid`'s descendants once `pid` has exited (however it ended). Stop it
    with `stop_reaper` when the tree was shut down cleanly."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(pid)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the job's terminal must not end the watcher before the job
    )


def stop_reaper(reaper: subprocess.Popen) -> None:
    reaper.terminate()
    try:
        reaper.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - it sleeps in short steps
        reaper.kill()


def _reap(pid: int) -> None:
    """The watcher's loop: remember `pid`'s descendants (with their start times, against pid reuse); once `pid` is
    gone, SIGKILL them and whatever they started since."""
    import psutil

    try:
        watched = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if not watched.is_running() or watched.status() == psutil.STATUS_ZOMBIE:
                break
            seen |= {child.pid: child for child in watched.children(recursive=True) if child.pid != os.getpid()}
        except psutil.NoSuchProcess:
            break
        time.sleep(PARENT_CHECK_INTERVAL_S)
    victims: dict[int, psutil.Process] = {}
    for process in seen.values():
        try:
            if process.is_running():  # same pid and start time: not a reused pid
                victims[process.pid] = process
                victims |= {child.pid: child for child in process.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    for process in victims.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


if __name__ == "__main__":  # the watcher process of `reap_descendants_when_gone`
    _reap(int(sys.argv[1]))
