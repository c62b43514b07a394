"""Face verification on image pairs: pair sampling, flip-TTA embedding, 10-fold accuracy.

Shapes: images uint8 (N,3,112,112), fed to the model as float (N,3,112,112) in [-1,1]; a pair list is
``idx_a, idx_b`` (P,) into the images with ``issame`` (P,) bool; pair features ``feat_a, feat_b`` (P,D).

Folds are the CONTIGUOUS k-fold split of the pair list (as sklearn ``KFold(shuffle=False)``: the first
``P % k`` folds hold one pair more); each fold's threshold is chosen on the other k-1 folds and its
accuracy measured on the fold itself. Two protocols:

insightface (InsightFace ``verification.py``, ``calculate_roc``): rows L2-normalised, distance
    ``sum((a - b)^2)``, "same" iff ``dist < t``, t in ``arange(0, 4, 0.01)``; the best training
    accuracy picks t, ties going to the smallest t (``np.argmax``).
askd (the A-SKD authors' ``eval_agedb.py``): mu = mean of the training folds' rows of feat_a and feat_b
    together, subtracted from every row, rows L2-normalised, score = cosine; "same" iff ``score > t``,
    "different" iff ``score < t`` (a score equal to t is wrong for both classes); t in
    ``arange(-10000, 10001) / 10000``; the best t is the MEAN of all t tied at the best training accuracy.

Both run in fp64 (the originals use the features' fp32), so a score within rounding of a grid point may
fall on the other side of it than in the original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

PROTOCOLS = ("insightface", "askd")
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)
ASKD_THRESHOLDS = np.arange(-10000, 10001) / 10000

Transform = Callable[[torch.Tensor], torch.Tensor]


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` or raise a ValueError listing the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    return protocol


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ----------------------------------------------------------------------------------------------- pairs


def _check_labels(labels) -> np.ndarray:
    labels = _to_numpy(labels)
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


# ------------------------------------------------------------------------------------------- accuracy


def fold_indices(num_pairs: int, nfolds: int = 10) -> list[np.ndarray]:
    """Contiguous test folds of ``range(num_pairs)``; the first ``num_pairs % nfolds`` hold one more.

    Returns nfolds int64 arrays of pair indices, in order, together covering every pair once.
    """
    if nfolds < 2:
        raise ValueError(f"nfolds must be >= 2, got {nfolds}")
    if num_pairs < nfolds:
        raise ValueError(f"need at least nfolds={nfolds} pairs, got {num_pairs}")
    sizes = np.full(nfolds, num_pairs // nfolds)
    sizes[: num_pairs % nfolds] += 1
    return np.split(np.arange(num_pairs), np.cumsum(sizes)[:-1])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x (P,D) scaled to unit L2 norm; an all-zero row stays zero (as sklearn's ``normalize``)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def insightface_distances(feat_a: np.ndarray, feat_b: np.ndarray) -> np.ndarray:
    """Squared euclidean distance of the L2-normalised rows, (P,D) x2 -> (P,), in [0, 4]."""
    return np.sum((l2_normalize(feat_a) - l2_normalize(feat_b)) ** 2, axis=1)


def askd_scores(feat_a: np.ndarray, feat_b: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Cosine scores (P,) after subtracting mu, the mean of the ``train`` rows of feat_a and feat_b together.

    ``train`` selects rows (bool mask (P,) or index array); only those rows enter mu, every row is scored.
    """
    mu = np.concatenate([feat_a[train], feat_b[train]]).mean(axis=0)
    return np.sum(l2_normalize(feat_a - mu) * l2_normalize(feat_b - mu), axis=1)


def _grid(protocol: str) -> np.ndarray:
    return INSIGHTFACE_THRESHOLDS if check_protocol(protocol) == "insightface" else ASKD_THRESHOLDS


def threshold_accuracies(values: np.ndarray, issame: np.ndarray, protocol: str, thresholds=None) -> np.ndarray:
    """Accuracy of the protocol's decision rule at each threshold: values (P,), issame (P,) -> (T,).

    ``values`` are distances (insightface) or scores (askd); ``thresholds`` defaults to the protocol's
    grid. Counting through sorted values keeps it O((P + T) log P) for the 20,001-point askd grid.
    """
    check_protocol(protocol)
    values, issame = np.asarray(values, dtype=np.float64), np.asarray(issame, dtype=bool)
    thresholds = np.asarray(_grid(protocol) if thresholds is None else thresholds, dtype=np.float64)
    genuine, impostor = np.sort(values[issame]), np.sort(values[~issame])
    if protocol == "insightface":  # same iff dist < t
        correct = np.searchsorted(genuine, thresholds, "left") + len(impostor)
        correct -= np.searchsorted(impostor, thresholds, "left")
    else:  # same iff score > t, different iff score < t: a score equal to t is wrong either way
        correct = len(genuine) - np.searchsorted(genuine, thresholds, "right")
        correct += np.searchsorted(impostor, thresholds, "left")
    return correct / len(values)


def best_threshold(values: np.ndarray, issame: np.ndarray, protocol: str) -> float:
    """The protocol's threshold of best accuracy on (values (P,), issame (P,)): the first of ties
    (insightface) or the mean of all tied thresholds (askd)."""
    acc = threshold_accuracies(values, issame, protocol)
    grid = _grid(protocol)
    if protocol == "insightface":
        return float(grid[np.argmax(acc)])
    # The accuracies are exact ratios of integer counts over one P, so == finds the ties.
    return float(grid[acc == acc.max()].mean())


def _check_pair_features(feat_a, feat_b, issame, nfolds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feat_a, feat_b = _to_numpy(feat_a).astype(np.float64), _to_numpy(feat_b).astype(np.float64)
    issame = _to_numpy(issame)
    if feat_a.ndim != 2 or feat_a.shape != feat_b.shape:
        raise ValueError(f"feat_a and feat_b must both be (P, D), got {feat_a.shape} and {feat_b.shape}")
    if issame.shape != (len(feat_a),):
        raise ValueError(f"issame must be ({len(feat_a)},) to match the features, got {issame.shape}")
    if issame.dtype != bool and not np.isin(issame, (0, 1)).all():
        raise ValueError("issame must be bool (or 0/1), one entry per pair")
    if not (np.isfinite(feat_a).all() and np.isfinite(feat_b).all()):
        raise ValueError("features contain NaN or inf")
    fold_indices(len(feat_a), nfolds)  # validates nfolds and P >= nfolds
    return feat_a, feat_b, issame.astype(bool)


def verification_accuracy(feat_a, feat_b, issame, protocol: str = "insightface", nfolds: int = 10) -> dict:
    """k-fold verification accuracy of pair features feat_a, feat_b (P,D) with labels issame (P,).

    Inputs may be numpy arrays or tensors. Returns ``{"accuracy": mean over folds in [0,1], "std":
    population std over folds, "fold_accuracies": [nfolds floats], "thresholds": [each fold's threshold]}``.
    """
    check_protocol(protocol)
    feat_a, feat_b, issame = _check_pair_features(feat_a, feat_b, issame, nfolds)
    accuracies, thresholds = [], []
    for test in fold_indices(len(issame), nfolds):
        train = np.ones(len(issame), bool)
        train[test] = False
        if protocol == "insightface":
            values = insightface_distances(feat_a, feat_b)
        else:  # mu comes from the training folds only
            values = askd_scores(feat_a, feat_b, train)
        t = best_threshold(values[train], issame[train], protocol)
        accuracies.append(float(threshold_accuracies(values[test], issame[test], protocol, [t])[0]))
        thresholds.append(t)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "thresholds": thresholds,
    }


# ------------------------------------------------------------------------------------------ embedding


def check_images(images) -> torch.Tensor:
    """Return ``images`` (tensor or numpy) as a uint8 tensor (N,3,H,W), N >= 1, or raise ValueError."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images must be uint8 (N,3,H,W) with N >= 1, got {tuple(images.shape)} {images.dtype}")
    return images


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 (B,3,H,W) in [-1,1], as the models are trained."""
    return images.float() / 127.5 - 1.0


def image_batches(images: torch.Tensor, batch_size: int, device) -> Iterator[torch.Tensor]:
    """Float model inputs in [-1,1] on ``device``, ``batch_size`` images (B,3,H,W) at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for batch in images.split(batch_size):
        yield to_model_input(batch.to(device))


@contextmanager
def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode for the block, then restore each one's train/eval flags."""
    modes = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, flags in zip(models, modes, strict=True):
            for m, flag in zip(model.modules(), flags, strict=True):
                m.training = flag


def flip_features(model: nn.Module, images, batch_size: int = 64, device="cpu", transform: Transform | None = None):
    """Embeddings of uint8 images (N,3,H,W) and of their horizontal flips: ``(feat (N,E), feat_flip (N,E))``.

    ``transform`` (e.g. ``lambda x: degrade(x, 14)``) acts on the float batch in [-1,1] after flipping,
    so the original and its flip get the same LR synthesis; it must treat images independently. The model
    runs in eval mode under ``torch.inference_mode()``; the outputs are fp32 CPU tensors.
    """
    images = check_images(images)
    feats, flips = [], []
    with eval_mode(model), torch.inference_mode():
        for x in image_batches(images, batch_size, device):
            views = torch.cat([x, x.flip(3)])  # dim 3 = width: a horizontal (mirror) flip
            if transform is not None:
                views = transform(views)
            emb = model(views)[0].float().cpu()
            feats.append(emb[: len(x)])
            flips.append(emb[len(x) :])
    return torch.cat(feats), torch.cat(flips)


def combine_flip(feat: torch.Tensor, feat_flip: torch.Tensor, protocol: str) -> torch.Tensor:
    """Merge flip-TTA embeddings (N,E) x2: their sum (insightface, (N,E)) or concatenation (askd, (N,2E))."""
    check_protocol(protocol)
    if feat.shape != feat_flip.shape or feat.dim() != 2:
        shapes = f"{tuple(feat.shape)} and {tuple(feat_flip.shape)}"
        raise ValueError(f"feat and feat_flip must both be (N, E), got {shapes}")
    return feat + feat_flip if protocol == "insightface" else torch.cat([feat, feat_flip], 1)


def _check_index(idx, n: int, name: str) -> torch.Tensor:
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D integer index, got shape {tuple(idx.shape)} {idx.dtype}")
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} must index the {n} images (0..{n - 1}), got range {int(idx.min())}..{int(idx.max())}")
    return idx.long()


def evaluate_pairs(
    model: nn.Module,
    images,
    idx_a,
    idx_b,
    issame,
    protocol: str = "insightface",
    transform: Transform | None = None,
    batch_size: int = 64,
    device="cpu",
    nfolds: int = 10,
) -> dict:
    """Verification accuracy of ``model`` on pairs (idx_a, idx_b, issame) (P,) of uint8 images (N,3,H,W).

    Each image in a pair is embedded once with flip TTA (and ``transform``), the flip embeddings are
    merged by :func:`combine_flip`, and :func:`verification_accuracy` scores the pairs; returns its dict.
    """
    check_protocol(protocol)
    images = check_images(images)
    idx_a, idx_b = _check_index(idx_a, len(images), "idx_a"), _check_index(idx_b, len(images), "idx_b")
    if len(idx_a) != len(idx_b):
        raise ValueError(f"idx_a and idx_b must have the same length, got {len(idx_a)} and {len(idx_b)}")
    used, inverse = torch.unique(torch.cat([idx_a, idx_b]), return_inverse=True)
    feat = combine_flip(*flip_features(model, images[used], batch_size, device, transform), protocol)
    p = len(idx_a)
    return verification_accuracy(feat[inverse[:p]], feat[inverse[p:]], issame, protocol, nfolds)
