"""Dropout whose draws do not depend on how the batch is split over processes.

``nn.Dropout`` draws a mask of the input's shape: with the global batch split over N processes, each draws a
mask for its share from its own generator, so an N-process run drops other units than a one-process run of
the same global batch, and the two diverge from the first step. :class:`ShareDropout` in a process that holds
share r of N (:func:`set_batch_share`) draws the mask of the whole global batch, as one process would, and
keeps its own rows: every process's generator then advances as the single process's does, the same mask
falls on the same sample whatever N, and a checkpoint's generator state fits every world size.

In one process (share 0 of 1, the default) it is ``nn.Dropout`` itself. The global mask costs N times the
local one: for the IR head's (B,512,7,7) a few MB, nothing next to the step. Same state dict as nn.Dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShareDropout(nn.Dropout):
    """nn.Dropout(p) that, on share ``rank`` of ``world`` equal shares of a global batch, applies the rows
    of the global batch's mask that fall on its share. x (b,...) -> (b,...), b = B / world."""

    share: tuple[int, int] = (0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank, world = self.share
        if world == 1 or not self.training or self.p == 0:
            return F.dropout(x, self.p, self.training, self.inplace)
        if self.p == 1:
            return x * 0
        # what F.dropout does on a CPU tensor (bernoulli, scale, multiply), on the global batch's shape: the
        # same generator draw and, for the CPU, the same mask as one process's
        b = x.shape[0]
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        noise = torch.empty((b * world, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=layout)
        noise.bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise[rank * b:(rank + 1) * b]


def set_batch_share(model: nn.Module, rank: int, world: int) -> None:
    """Tell every :class:`ShareDropout` of ``model`` that its batches are share ``rank`` of ``world``."""
    if not 0 <= rank < world:
        raise ValueError(f"batch share {rank} of {world}: expected 0 <= rank < world")
    for m in model.modules():
        if isinstance(m, ShareDropout):
            m.share = (rank, world)
