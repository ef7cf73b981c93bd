"""Exact duplicates (same sha256) and near duplicates (cosine similarity of unit embeddings at or above a
threshold), grouped by connected components, and flagged when a group spans splits or labels.

The near-duplicate search compares blocks of `block` rows against all rows: memory O(block x n), never the
n x n matrix (10,000 images: 40 MB a block, not 400 MB), and keeps at most `MAX_NEIGHBOURS` partners per
image, so the pairs stay O(n) however many images look alike."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from training.audit.schema import AuditedImage, DuplicateGroup

DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.90
"""Cosine similarity of ImageNet embeddings at or above which two images count as the same photo; measured
by `python -m benchmarks.audit threshold` (docs/AUDIT.md#near-duplicate-threshold)."""

BLOCK_ROWS = 1024


MAX_NEIGHBOURS = 32
"""Most near-duplicate partners kept per image (its most similar ones): a set of thousands of near-identical
images (blank frames, a burst of one scene) would otherwise make O(n^2) pairs; the groups stay connected."""


def similar_pairs(
    unit: np.ndarray, threshold: float, block: int = BLOCK_ROWS, max_neighbours: int = MAX_NEIGHBOURS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) with i < j of every pair with cosine similarity >= threshold where j is among i's
    `max_neighbours` most similar rows or i among j's; block by block, O(block x n) memory."""
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    n = len(unit)
    keep_per_row = max(1, min(max_neighbours, n - 1))
    if n < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    rows, cols, sims = [], [], []
    for start in range(0, n, block):
        similarity = unit[start : start + block] @ unit.T
        local = np.arange(len(similarity))
        similarity[local, local + start] = -np.inf  # never its own partner
        best = np.argpartition(-similarity, keep_per_row - 1, axis=1)[:, :keep_per_row]
        best_sim = np.take_along_axis(similarity, best, axis=1)
        r, c = np.nonzero(best_sim >= threshold)
        rows.append(r + start)
        cols.append(best[r, c])
        sims.append(best_sim[r, c])
    i, j, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low.astype(np.int64) * n + high, return_index=True)
    return low[first], high[first], s[first]


def _group(images: Sequence[AuditedImage], members: Sequence[int], kind: str, similarity: float) -> DuplicateGroup:
    chosen = [images[m] for m in members]
    return DuplicateGroup(
        kind=kind,
        images=chosen,
        similarity=round(float(similarity), 6),
        across_splits=len({image.split for image in chosen}) > 1,
        across_labels=len({image.label for image in chosen}) > 1,
    )


def exact_groups(images: Sequence[AuditedImage], hashes: Sequence[str]) -> list[DuplicateGroup]:
    """Images whose files have the same sha256 (two or more per group)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(hashes):
        by_hash[digest].append(index)
    return [_group(images, members, "exact", 1.0) for members in by_hash.values() if len(members) > 1]


def near_groups(
    images: Sequence[AuditedImage], unit: np.ndarray, threshold: float, exclude_same: Sequence[str] = ()
) -> list[DuplicateGroup]:
    """Connected components of the >= threshold similarity graph. Pairs of byte-identical files (`exclude_same`:
    their sha256 per image) are left to `exact_groups`; a component made of exact copies only is dropped."""
    n = len(images)
    i, j, s = similar_pairs(unit, threshold)
    if len(exclude_same):
        hashes = np.asarray(exclude_same, dtype=object)
        differ = hashes[i] != hashes[j]
        i, j, s = i[differ], j[differ], s[differ]
    if not len(i):
        return []
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    count, component = connected_components(graph, directed=False)
    weakest: dict[int, float] = defaultdict(lambda: 1.0)
    for a, similarity in zip(i, s):
        weakest[component[a]] = min(weakest[component[a]], float(similarity))
    members: dict[int, list[int]] = defaultdict(list)
    for index in np.unique(np.concatenate([i, j])):
        members[component[index]].append(int(index))
    return [_group(images, m, "near", weakest[c]) for c, m in members.items() if len(m) > 1]


def rank_groups(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    """Across labels first (a label error), then across splits (an inflated estimate), then the rest."""
    return sorted(groups, key=lambda g: (not g.across_labels, not g.across_splits, g.kind != "exact", -g.similarity))
