"""`transfer-serve audit`: look at labelled data before (and after) training on it.

Modules, lowest first:

* `schema`: the pydantic shape of `audit.json` (`AuditReport` and every finding), declared once;
* `scan`: every file read once, hashed (sha256) and decoded through the one decoding function;
* `embedder`: the default ImageNet backbone exported once as an embedding-only artifact (without `--artifact`);
  the embeddings themselves come from extraction's engine (`extraction.embed.embed_paths`, local or Ray
  Data), which the caller passes in (training does not import extraction);
* `duplicates`: exact (content hash) and near (cosine similarity, blockwise) duplicate groups, flagged
  across splits and across labels;
* `label_issues`: out-of-fold probe probabilities ranked by confident learning (Northcutt et al., 2021);
* `outliers`: images per class and a per-class k-nearest-neighbour outlier score;
* `checks`: the cheap checks `train` runs before it trains;
* `run`: `run_audit` (all of the above), `audit.json`, `audit.html` and the one-line summary.
"""
