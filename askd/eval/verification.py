"""Face verification on image pairs: the two protocols' 10-fold accuracy, and a model's accuracy on a pair list.

Shapes: images uint8 (N,3,112,112), fed to the model as float (N,3,112,112) in [-1,1]; a pair list is
``idx_a, idx_b`` (P,) into the images with ``issame`` (P,) bool; pair features ``feat_a, feat_b`` (P,D).
Pair lists are sampled by :mod:`askd.data.pairs` and images embedded by :mod:`askd.eval.embed`; both are
importable from here too.

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

import numpy as np
import torch
from torch import nn

# Names imported "as" themselves are re-exported: importable from here, where they lived before the split.
from ..data.pairs import make_pairs as make_pairs
from .embed import Transform, check_images, flip_features
from .embed import eval_mode as eval_mode
from .embed import image_batches as image_batches
from .embed import to_model_input as to_model_input

PROTOCOLS = ("insightface", "askd")
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)
ASKD_THRESHOLDS = np.arange(-10000, 10001) / 10000


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` or raise a ValueError listing the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    return protocol


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


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


# ------------------------------------------------------------------------------------- model on pairs


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
