"""Verification pair sampling: ``make_pairs(labels, num_pairs, seed)`` draws a balanced pair list from labels.

Shapes: ``labels`` (N,) integer identities, one per image; a pair list is ``idx_a, idx_b`` (P,) into the
images with ``issame`` (P,) bool, as :mod:`askd.eval.verification` scores it. Genuine and impostor pairs
alternate, so the contiguous k-fold split of the verification protocols sees both kinds in every fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _check_labels(labels) -> np.ndarray:
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D sequence of integers, got shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64)


def _sample_ids(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct ids from [0, total), or every id repeated as evenly as possible when n > total."""
    if n <= total:
        return rng.choice(total, size=n, replace=False)
    reps = -(-n // total)
    return np.concatenate([rng.permutation(total) for _ in range(reps)])[:n]


def _decode_pairs(ids: np.ndarray, first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair id -> (p, q) positions, where position p owns ids [offset_p, offset_p + count_p) and the
    partners ``first_p, first_p + 1, ...``; every unordered pair appears once. ids, first, count: 1-D."""
    ends = np.cumsum(count)
    p = np.searchsorted(ends, ids, side="right")
    return p, first[p] + ids - (ends[p] - count[p])


def make_pairs(labels: Sequence[int] | torch.Tensor, num_pairs: int, seed: int = 0):
    """Sample a verification pair list from per-image identity ``labels`` (N,).

    Genuine pairs (same label, two different images) and impostor pairs (different labels) are drawn
    uniformly without replacement from all unordered pairs of their kind; only when a kind has fewer
    distinct pairs than asked for are its pairs repeated. They alternate genuine, impostor, genuine, ...
    so that every contiguous fold of two or more pairs holds both kinds and is balanced to within one
    (an odd ``num_pairs`` has one genuine pair more). Deterministic for a given ``seed``.

    Returns ``(idx_a LongTensor (P,), idx_b LongTensor (P,), issame BoolTensor (P,))``, P = num_pairs.
    """
    labels = _check_labels(labels)
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2 (one genuine and one impostor pair), got {num_pairs}")
    # Positions in label-sorted order make each identity a contiguous run [start, end).
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    if len(sizes) < 2:
        raise ValueError(f"need at least 2 identities for impostor pairs, got {len(sizes)}")
    if sizes.max() < 2:
        raise ValueError("need an identity with at least 2 images for genuine pairs; every label occurs once")
    pos = np.arange(len(labels))
    ends = np.repeat(starts + sizes, sizes)
    # Genuine partners of p: later images of its identity; impostor partners: every image after its run.
    kinds = {True: (pos + 1, ends - pos - 1), False: (ends, len(labels) - ends)}
    rng = np.random.default_rng(seed)
    idx_a, idx_b = np.empty(num_pairs, np.int64), np.empty(num_pairs, np.int64)
    issame = np.zeros(num_pairs, bool)
    issame[0::2] = True
    for same, (first, count) in kinds.items():
        slots = np.flatnonzero(issame == same)
        p, q = _decode_pairs(_sample_ids(int(count.sum()), len(slots), rng), first, count)
        idx_a[slots], idx_b[slots] = order[p], order[q]
    return torch.from_numpy(idx_a), torch.from_numpy(idx_b), torch.from_numpy(issame)
