"""The numeric conventions every backend of the fused ops shares, in one leaf module that imports only torch.

The references (:mod:`askd.ops`) and the Triton kernels (:mod:`askd.kernels`) both import from here, so the
kernels never import :mod:`askd.ops` (which loads them by name): the imports point one way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# the cosine's floor on |t| * |s| (torch.nn.functional.cosine_similarity's eps): an all-zero map gives cos 0
EPS = 1e-8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and map) dtype for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x is laid out that way (and not also plain contiguous), else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None where autocast is off (or does not exist)."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def cbam_mlp(chan: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """CBAM's channel MLP on both pooled vectors: chan (B,2,C), w1 (R,C), w2 (C,R) -> (a_c (B,C), hidden (B,2,R)).

    a_c = w2 @ (relu(w1 @ chan[:,0]) + relu(w1 @ chan[:,1])); hidden is after the ReLU.
    """
    hidden = F.relu(chan @ w1.t())
    return hidden.sum(dim=1) @ w2.t(), hidden


def cbam_mlp_backward(ga_c: Tensor, chan: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient ga_c (B,C) of :func:`cbam_mlp`'s a_c -> dchan (B,2,C), dw1 (R,C), dw2 (C,R), all in ga_c's dtype."""
    _, hidden = cbam_mlp(chan, w1, w2)
    dw2 = ga_c.t() @ hidden.sum(dim=1)
    # ReLU's gradient as torch's (threshold_backward): zero where hidden <= 0, even for a NaN or infinite upstream
    # gradient, which a product with the mask would turn into NaN there; a NaN hidden passes it
    dhidden = torch.where(hidden <= 0, 0.0, (ga_c @ w2)[:, None, :])
    dw1 = (dhidden.transpose(1, 2) @ chan).sum(dim=0)
    return dhidden @ w1, dw1, dw2
