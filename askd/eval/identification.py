"""Closed-set face identification with distractors (TinyFace protocol): rank-k accuracy (CMC) and mAP.

Shapes: probe features (P,D) with integer labels (P,); gallery features (G,D) with integer labels (G,).
A gallery entry whose label matches no probe label is a distractor (:mod:`askd.data.tinyface` gives them -1).
Images are uint8 (N,3,size,size), fed to the model as in :mod:`askd.eval.embed`.

Scores and order. Rows are L2-normalised (an all-zero row stays zero), score = cosine (dot product of the
unit rows, fp64). Each probe ranks the whole gallery by a STABLE sort on descending score: equal scores keep
gallery order, so the rank of entry g is ``1 + #{j: s_j > s_g} + #{j < g: s_j == s_g}``. The release's
MATLAB evaluation (``test_face_identification.m``, as ported to Python by others) ranks by ascending euclidean
distance with MATLAB's ``sort``, which keeps equal elements in order; on unit rows that is the same order up to
rounding. Similarities are computed ``block`` probes at a time: only a (block, G) score matrix exists at once
(plus the gathered rows of its true matches, at most as large), and ranks are counted for the true matches
only, never by sorting a row.

Metrics, for a probe whose true matches sit at ranks n_1 < ... < n_m (m >= 1):
- rank-k accuracy (CMC at k): the fraction of probes with n_1 <= k.
- ``mAP``: the mean over probes of the official TinyFace AP (``compute_AP.m`` of the release, the
  Market-1501 code): a trapezoid over the precision-recall steps,
  ``AP = (1/m) sum_i (p(n_i - 1) + p(n_i)) / 2`` with ``p(n) = #matches in the top n / n`` and p(0) = 1.
  A single match at rank 1 gives 1, at rank r > 1 gives 1/(2r).
- ``mAP_standard``: the mean of the usual non-interpolated AP, ``(1/m) sum_i i / n_i`` (TREC; sklearn's
  ``average_precision_score``); a single match at rank r gives 1/r.
Probes without any true match in the gallery: TinyFace has none (every probe's identity is in
Gallery_Match), so by default (``unmatched="error"``) they raise a ValueError; ``unmatched="miss"`` counts
them as misses instead (AP 0, never within rank k), keeping them in every denominator.

TinyFace: :func:`evaluate_tinyface` streams the test set that :mod:`askd.data.tinyface` lists (its layout,
identities and image sizes are described there) through the model, then scores it as above. The gallery is
Gallery_Match then the distractors, as in the official code, so a tie between a match and a distractor goes
to the match.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

# Names imported "as" themselves are re-exported: importable from here, where they lived before the split.
from ..data.tinyface import DISTRACTOR_FOLDERS as DISTRACTOR_FOLDERS
from ..data.tinyface import DISTRACTOR_LABEL as DISTRACTOR_LABEL
from ..data.tinyface import TINYFACE_LAYOUT as TINYFACE_LAYOUT
from ..data.tinyface import ImageFiles, tinyface_lists
from ..data.tinyface import TinyFaceLists as TinyFaceLists
from ..data.tinyface import identity_of as identity_of
from ..data.tinyface import load_tinyface as load_tinyface
from .embed import Transform, eval_mode, flip_features, to_model_input
from .verification import combine_flip

RANKS = (1, 5, 10, 20, 50)
UNMATCHED = ("error", "miss")

# ------------------------------------------------------------------------------------------- metrics


def _check_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or 0 in x.shape or not x.is_floating_point():
        raise ValueError(f"{name} must be floating-point (N, D) with N, D >= 1, got shape {tuple(x.shape)} {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_labels(labels, n: int, name: str) -> np.ndarray:
    labels = torch.as_tensor(labels)
    shape = tuple(labels.shape)
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be ({n},) integers, one per feature row, got {shape} {labels.dtype}")
    return labels.cpu().numpy().astype(np.int64)


def _check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    ranks = tuple(ranks)
    if not ranks or not all(isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 1 for k in ranks):
        raise ValueError(f"ranks must be a non-empty sequence of integers >= 1, got {ranks!r}")
    return tuple(int(k) for k in ranks)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """fp64 rows of x scaled to unit L2 norm; an all-zero row stays zero (as verification.l2_normalize)."""
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def match_pairs(probe_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (probe, gallery) pair with equal labels, grouped by probe, gallery index ascending within a probe.

    Returns ``(probe_idx (M,), gallery_idx (M,), starts (P+1,))``: probe p's pairs are ``starts[p]:starts[p+1]``.
    """
    order = np.argsort(gallery_labels, kind="stable")  # stable: each label's run keeps gallery order
    sorted_labels = gallery_labels[order]
    lo = np.searchsorted(sorted_labels, probe_labels, "left")
    counts = np.searchsorted(sorted_labels, probe_labels, "right") - lo
    starts = np.concatenate([[0], np.cumsum(counts)])
    within = np.arange(starts[-1]) - np.repeat(starts[:-1], counts)
    return np.repeat(np.arange(len(probe_labels)), counts), order[np.repeat(lo, counts) + within], starts


def stable_ranks(scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """1-based rank of entry ``cols[i]`` of row i of ``scores`` (C,G) in a stable descending sort of that row.

    An entry is preceded by every higher score and by equal scores earlier in the row. Returns int64 (C,).
    """
    own = scores.gather(1, cols[:, None])
    earlier = torch.arange(scores.shape[1], device=scores.device)[None, :] < cols[:, None]
    return 1 + ((scores > own) | ((scores == own) & earlier)).sum(1)


def _match_ranks(probe: torch.Tensor, gallery: torch.Tensor, probe_idx, gallery_idx, starts, block: int) -> np.ndarray:
    """Rank of every true match (M,) given unit rows probe (P,D), gallery (G,D), ``block`` probes at a time."""
    ranks = np.empty(len(probe_idx), np.int64)
    for b0 in range(0, len(probe), block):
        b1 = min(b0 + block, len(probe))
        scores = probe[b0:b1] @ gallery.T  # (B, G): the only score matrix alive
        # The block's pairs are contiguous; gathering their rows is chunked too, bounding memory by (block, G).
        for c0 in range(starts[b0], starts[b1], block):
            c1 = min(c0 + block, starts[b1])
            rows = torch.from_numpy(probe_idx[c0:c1] - b0).to(scores.device)
            cols = torch.from_numpy(gallery_idx[c0:c1]).to(scores.device)
            ranks[c0:c1] = stable_ranks(scores[rows], cols).cpu().numpy()
    return ranks


def _per_probe(ranks: np.ndarray, probe_idx: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per probe (P,): official AP, standard AP and first-match rank (inf without a match), from match ranks."""
    num_probes, counts = len(starts) - 1, np.diff(starts)
    n = ranks[np.lexsort((ranks, probe_idx))].astype(np.float64)  # each probe's ranks ascending, groups in place
    i = np.arange(len(n)) - np.repeat(starts[:-1], counts) + 1.0  # i-th match of its probe
    m = np.repeat(counts, counts)
    precision = i / n
    before = np.where(n > 1, (i - 1) / np.maximum(n - 1, 1), 1.0)  # precision one rank earlier; p(0) = 1
    ap = np.bincount(probe_idx, (before + precision) / (2 * m), minlength=num_probes)
    ap_standard = np.bincount(probe_idx, precision / m, minlength=num_probes)
    first = np.full(num_probes, np.inf)
    first[counts > 0] = n[starts[:-1][counts > 0]]
    return ap, ap_standard, first


def identification_metrics(
    probe_feat,
    probe_labels,
    gallery_feat,
    gallery_labels,
    ranks: Sequence[int] = RANKS,
    block: int = 1024,
    unmatched: str = "error",
) -> dict:
    """Rank-k accuracies and mAP of probes (P,D) against a gallery (G,D), as defined in the module docstring.

    Features are float arrays or tensors (computed in fp64 on the gallery's device), labels integer (P,), (G,).
    ``block`` probes are scored at a time (peak memory about 2 x block x G x 8 bytes: 2.6 GB for TinyFace at
    1024); the result does not depend on it beyond fp64 rounding of the scores. ``unmatched``: "error" raises
    for a probe with no true match, "miss" counts it as AP 0 and a miss at every rank.

    Returns ``{"rank-k": fraction in [0,1] for each k in ranks, "mAP": official TinyFace mAP, "mAP_standard":
    non-interpolated mAP, "num_probes": P, "num_gallery": G, "num_distractors": gallery entries matching no
    probe, "num_unmatched": probes without a match}``.
    """
    gallery = _check_features(gallery_feat, "gallery_feat")
    probe = _check_features(probe_feat, "probe_feat").to(gallery.device)
    if probe.shape[1] != gallery.shape[1]:
        raise ValueError(f"probe_feat and gallery_feat differ in dimension: {probe.shape[1]} vs {gallery.shape[1]}")
    p_labels = _check_labels(probe_labels, len(probe), "probe_labels")
    g_labels = _check_labels(gallery_labels, len(gallery), "gallery_labels")
    ranks = _check_ranks(ranks)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    if unmatched not in UNMATCHED:
        raise ValueError(f"unknown unmatched rule {unmatched!r}; expected one of {list(UNMATCHED)}")

    probe_idx, gallery_idx, starts = match_pairs(p_labels, g_labels)
    lonely = np.flatnonzero(np.diff(starts) == 0)
    if len(lonely) and unmatched == "error":
        raise ValueError(f"{len(lonely)} probe(s) have no true match in the gallery (first: probe {lonely[0]}, "
                         f"label {p_labels[lonely[0]]}); pass unmatched='miss' to count them as misses")
    ranks_of_matches = _match_ranks(_unit_rows(probe), _unit_rows(gallery), probe_idx, gallery_idx, starts, block)
    ap, ap_standard, first = _per_probe(ranks_of_matches, probe_idx, starts)
    return {
        **{f"rank-{k}": float(np.mean(first <= k)) for k in ranks},
        "mAP": float(ap.mean()),
        "mAP_standard": float(ap_standard.mean()),
        "num_probes": len(probe),
        "num_gallery": len(gallery),
        "num_distractors": int(np.isin(g_labels, p_labels, invert=True).sum()),
        "num_unmatched": len(lonely),
    }


# ------------------------------------------------------------------------------------------ TinyFace


def _embed(model: nn.Module, images: torch.Tensor, device, transform: Transform | None, flip: bool) -> torch.Tensor:
    """fp32 CPU embeddings (B,E) of uint8 images (B,3,H,W); with ``flip``, the sum over the image and its mirror."""
    if flip:  # the sum has the direction of the A-SKD authors' mean, and cosine sees only the direction
        return combine_flip(*flip_features(model, images, len(images), device, transform), "insightface")
    x = to_model_input(images.to(device))
    return model(x if transform is None else transform(x))[0].float().cpu()


def embed_files(
    model: nn.Module,
    paths: Sequence[str | Path],
    size: int = 112,
    batch_size: int = 64,
    device="cpu",
    transform: Transform | None = None,
    flip: bool = True,
    num_workers: int = 0,
) -> torch.Tensor:
    """fp32 CPU embeddings (N,E) of the image files ``paths``, decoded and embedded ``batch_size`` at a time.

    Only the features are kept, never all images. ``transform`` acts on the float batch in [-1,1] (after
    flipping, as in :func:`askd.eval.embed.flip_features`); the model runs in eval mode under
    ``torch.inference_mode()``. A tqdm bar counts the images.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    loader = DataLoader(ImageFiles([Path(p) for p in paths], size), batch_size=batch_size, num_workers=num_workers)
    feats = []
    bar = tqdm(total=len(paths), desc="embedding", unit="img", dynamic_ncols=True, mininterval=1.0)
    with bar, eval_mode(model), torch.inference_mode():
        for images in loader:
            feats.append(_embed(model, images, device, transform, flip))
            bar.update(len(images))
    return torch.cat(feats)


def evaluate_tinyface(
    model: nn.Module,
    root: str | Path,
    batch_size: int = 64,
    device="cpu",
    transform: Transform | None = None,
    flip: bool = True,
    size: int = 112,
    num_workers: int = 0,
    ranks: Sequence[int] = RANKS,
    block: int = 1024,
) -> dict:
    """TinyFace identification of ``model``: stream every test image through :func:`embed_files`, then
    :func:`identification_metrics` (probes must all have a match). Returns its dict plus
    ``"distractor_folder"``, the distractor spelling found under ``root``.
    """
    lists = tinyface_lists(root)
    feat = embed_files(model, lists.probe_paths + lists.gallery_paths, size, batch_size, device, transform, flip,
                       num_workers)
    num_probes = len(lists.probe_paths)
    metrics = identification_metrics(feat[:num_probes], lists.probe_labels, feat[num_probes:], lists.gallery_labels,
                                     ranks, block)
    return {**metrics, "distractor_folder": lists.distractor_folder}
