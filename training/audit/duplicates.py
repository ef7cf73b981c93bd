"""Exact duplicates (same sha256) and near duplicates (cosine similarity of unit embeddings at or above a
threshold), grouped by connected components, and flagged when a group spans splits or labels.

The near-duplicate search compares blocks of `block` rows against all rows: memory O(block x n), never the
n x n matrix (10,000 images: 40 MB a block, not 400 MB)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from training.audit.schema import AuditedImage, DuplicateGroup

DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.97
"""Cosine similarity of ImageNet embeddings at or above which two images count as the same photo; measured
by benchmarks/audit_threshold.py (docs/AUDIT.md#threshold)."""

BLOCK_ROWS = 1024


def similar_pairs(unit: np.ndarray, threshold: float, block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) of every pair i < j with cosine similarity >= threshold, block by block."""
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    rows, cols, sims = [], [], []
    for start in range(0, len(unit), block):
        similarity = unit[start : start + block] @ unit.T
        i, j = np.nonzero(similarity >= threshold)
        keep = j > i + start
        rows.append(i[keep] + start)
        cols.append(j[keep])
        sims.append(similarity[i[keep], j[keep]])
    if not rows:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


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
