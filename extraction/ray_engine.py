"""The extraction job on Ray Data (`--engine ray`): same inputs, shards, schema, resume and errors as the
local engine; only the execution differs.

    ray.data.from_items(pending rows)                 # read: (index, path) of the unfinished shards
      .map_batches(decode_batch, ...)                 # CPU tasks: load_image + the artifact's preprocessing
      .map_batches(EmbeddingPredictor, ...)           # actors holding the runtime; GPUs per actor, concurrency
    -> streamed back to the driver, which writes each shard atomically as soon as all its rows arrived

Writing from the driver (rather than `Dataset.write_parquet`) keeps the local engine's shard layout
(`part-NNNNN.parquet` = inputs `[N*shard_size, (N+1)*shard_size)`, rows sorted by input index), its
atomic write-then-rename, and per-shard resume while the job streams. Only the small result columns
reach the driver; decoded pixels stay in the cluster.

The job joins an existing cluster when `RAY_ADDRESS` is set (`ray.init(address=...)`) and otherwise starts
a local Ray; a Ray already initialised in this process (tests, notebooks) is used as it is. A local Ray the job
starts ends with the job, even when the job is killed with SIGKILL (`models.lifetime.reap_descendants_when_gone`:
Ray's dashboard and runtime-env agents outlive their driver otherwise). Ray is an optional extra
(`pip install .[ray]`) and imported only here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import pyarrow as pa

from extraction.config import ExtractionError
from extraction.decode import decode_batch
from extraction.plan import JobPlan
from extraction.predictor import EmbeddingPredictor
from extraction.progress import progress_bar
from extraction.shards import ShardAssembler
from models.lifetime import reap_descendants_when_gone, stop_reaper


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ExtractionError(
            "--engine ray needs Ray Data, an optional extra: pip install 'transfer-serve[ray]' (or '.[ray]')"
        ) from None
    return ray


@contextlib.contextmanager
def _connected(ray, local_num_cpus: int | None) -> Iterator[None]:
    """Use the running Ray, join RAY_ADDRESS, or start a local Ray that ends with this job (shut down on the way
    out; its processes SIGKILLed by a watcher if this process is killed)."""
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    reaper = reap_descendants_when_gone(os.getpid())
    try:
        ray.init(num_cpus=local_num_cpus, include_dashboard=False, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        stop_reaper(reaper)


def run_ray(plan: JobPlan, assembler: ShardAssembler, pending: Sequence[int]) -> dict[str, str]:
    """Run the pending shards on Ray Data; returns the device description."""
    ray = _import_ray()
    config, options = plan.config, plan.config.ray
    with _connected(ray, options.local_num_cpus):
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = config.show_progress
        indices = [index for shard in pending for index in plan.shard_range(shard)]
        paths = [os.fsencode(plan.inputs.paths[i]) for i in indices]  # bytes: any name the OS gives, not only UTF-8
        table = pa.table({"index": pa.array(indices, pa.int64()), "path": pa.array(paths, pa.binary())})
        block_rows = max(config.batch_size, -(-len(indices) // 200))
        blocks = [table.slice(start, block_rows) for start in range(0, len(indices), block_rows)]
        dataset = (
            ray.data.from_arrow(blocks)
            .map_batches(
                decode_batch,
                fn_kwargs={"preprocessing": plan.manifest.preprocessing.model_dump(), "max_pixels": config.max_pixels},
                batch_size=config.batch_size,
                batch_format="numpy",
                num_cpus=options.decode_cpus,
            )
            .map_batches(
                EmbeddingPredictor,
                fn_constructor_kwargs=plan.predictor_kwargs(),
                batch_size=config.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=options.concurrency),
                num_gpus=options.num_gpus,
                num_cpus=options.cpus_per_actor,
            )
        )
        with progress_bar(len(indices), config.show_progress, "extract (ray)") as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(assembler.add(batch))
        return {"device": plan.inference.device}
