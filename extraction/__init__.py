"""The offline extraction job: image files -> Parquet shards of embeddings and predictions.

Modules, lowest first (each imports only those above it):

* `config`: `ExtractionConfig`, `RayOptions`, `ExtractionError` (every option of `transfer-serve extract`);
* `inputs`: an image folder (recursive) or a .csv / .parquet manifest with a `path` column, sorted and
  de-duplicated, so the same inputs always give the same shards;
* `table`: the Parquet schema of a shard and the Arrow table builder both engines write through;
* `plan`: `JobPlan` (inputs, shards, resolved runtime) and `JobIdentity` (what makes two runs the same job);
* `shards`: the output folder: file names, lock, `prepare_output` (resume or refuse), atomic `write_shard`
  (input `i` goes to shard `i // shard_size`, `part-00000.parquet`, ...), `ShardAssembler`, error records;
* `decode` (`ImageDecoder`) and `predictor` (`EmbeddingPredictor`): the two stages, plain callables;
* `local` and `ray_engine`: the two engines, sharing everything above but the execution;
* `job`: `run_extraction` (plan, lock, resume, run an engine, summary) and `read_errors`;
* `embed`: `embed_paths`, the job run on a list of files and read back as arrays (what `transfer-serve audit` uses).
"""
