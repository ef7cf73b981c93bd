"""The local engine: decoding in DataLoader worker processes (`ImageDecoder`), batched inference in this
process (`EmbeddingPredictor`), shards written as they complete, a progress bar with images/s and ETA."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from typing import Sequence

import numpy as np

from extraction.decode import ImageDecoder
from extraction.plan import JobPlan
from extraction.predictor import EmbeddingPredictor
from extraction.progress import progress_bar
from extraction.shards import ShardAssembler


class _BatchDataset:
    """Item i = the decoded batch i (a map-style dataset for a DataLoader with batch_size=None)."""

    def __init__(self, paths: Sequence[str], batches: Sequence[range], decoder: ImageDecoder) -> None:
        self.paths = paths
        self.batches = batches
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rows = self.batches[i]
        return self.decoder(
            {"index": np.arange(rows.start, rows.stop, dtype=np.int64), "path": np.asarray(self.paths[rows.start:rows.stop], dtype=object)}
        )


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


PARENT_CHECK_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: this decoding worker ends as soon as the job's process does, even when that
    is killed with SIGKILL (which runs no cleanup; the worker would otherwise be adopted by PID 1 and keep
    its memory). Linux: the kernel sends SIGKILL when the parent dies (`prctl(PR_SET_PDEATHSIG)`); everywhere:
    a daemon thread that SIGKILLs this worker once its parent pid changes. Also gives decoding memory back."""
    from models.memory import configure_allocator

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    configure_allocator()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        threading.Event().wait(PARENT_CHECK_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _pending_batches(plan: JobPlan, pending: Sequence[int]) -> list[range]:
    size = plan.config.batch_size
    batches = []
    for shard in pending:
        rows = plan.shard_range(shard)
        batches.extend(range(start, min(start + size, rows.stop)) for start in range(rows.start, rows.stop, size))
    return batches


def run_local(plan: JobPlan, assembler: ShardAssembler, pending: Sequence[int]) -> dict[str, str]:
    """Decode in `workers` processes, infer here, write shards as they complete; returns the runtime's description."""
    from torch.utils.data import DataLoader

    config = plan.config
    batches = _pending_batches(plan, pending)
    dataset = _BatchDataset(plan.inputs.paths, batches, ImageDecoder(plan.manifest.preprocessing, config.max_pixels))
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=None,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=_as_is,
        prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if config.workers else None,
    )
    decoded = iter(loader)  # workers start decoding while the model loads
    try:
        predictor = EmbeddingPredictor(**plan.predictor_kwargs())
        with progress_bar(sum(len(b) for b in batches), config.show_progress, "extract") as bar:
            for batch in decoded:
                bar.update(assembler.add(predictor(batch)))
        return predictor.describe()
    finally:
        del decoded  # shuts the decoding workers down, also when interrupted
