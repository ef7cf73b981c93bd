"""The local engine: decoding in DataLoader worker processes (`ImageDecoder`), batched inference in this
process (`EmbeddingPredictor`), shards written as they complete, a progress bar with images/s and ETA."""

from __future__ import annotations

import functools
import os
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


def _init_decoding_worker(parent_pid: int, _worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: this decoding worker ends as soon as the job's process does, even when that
    is killed with SIGKILL (models/lifetime.py), and gives decoding memory back (models/memory.py)."""
    from models.lifetime import die_with_parent
    from models.memory import configure_allocator

    die_with_parent(parent_pid)
    configure_allocator()


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
        worker_init_fn=functools.partial(_init_decoding_worker, os.getpid()) if config.workers else None,
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
