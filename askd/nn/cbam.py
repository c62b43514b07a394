"""CBAM: channel then spatial attention that also returns its maps (Woo et al., ECCV 2018).

A-SKD distils these maps, so the module returns them from ``forward`` instead of exposing them
through hooks. Shapes: x (B,C,H,W) -> y (B,C,H,W), channel_map (B,C), spatial_map (B,1,H,W).

    channel logits  a_c = MLP(avgpool_hw(x)) + MLP(maxpool_hw(x))      MLP = 1x1 conv, ReLU, 1x1 conv
    x_c             = x * sigmoid(a_c)
    spatial logits  a_s = conv_kxk(cat(mean_c(x_c), max_c(x_c)))      no bias, no BN
    y               = x_c * sigmoid(a_s)

``maps="logits"`` returns (a_c, a_s) as the authors' code distils them; ``maps="sigmoid"`` returns
(sigmoid(a_c), sigmoid(a_s)) as the paper's text describes.

``backend`` picks the implementation (:mod:`askd.backend`): ``"torch"`` runs the formula's reference
:func:`askd.ops.cbam.cbam_ref` on the module's weights, ``"triton"`` and ``"ext"`` the fused op
:func:`askd.ops.cbam.cbam` (same formula; its maps come back in float32, float64 for float64 input),
``"auto"`` the fastest available; None means ``$ASKD_BACKEND`` or ``"torch"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import backend as backends
from ..ops.cbam import cbam as cbam_op
from ..ops.cbam import cbam_ref, check_dtypes, check_x
from ..ops.cosine_distill import check_maps

MAP_KINDS = ("logits", "sigmoid")
KINDS = ("channel", "spatial")  # the order of the two maps of a block
MapPair = tuple[torch.Tensor, torch.Tensor]


class CBAM(nn.Module):
    """Channel + spatial attention returning ``(y, channel_map, spatial_map)``.

    Args:
        channels: C of the input.
        reduction: hidden width of the channel MLP is ``max(channels // reduction, 1)``.
        spatial_kernel: k of the spatial conv, 3 (authors' code) or 7 (paper).
        maps: ``"logits"`` (pre-sigmoid, authors' code) or ``"sigmoid"`` (paper).
        backend: ``"torch"``, ``"triton"``, ``"ext"``, ``"auto"`` or None (``$ASKD_BACKEND``, else torch).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        spatial_kernel: int = 3,
        maps: str = "logits",
        backend: str | None = None,
    ):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"CBAM needs channels >= 1 and reduction >= 1, got {channels} and {reduction}")
        if spatial_kernel not in (3, 7):
            raise ValueError(f"CBAM spatial_kernel must be 3 or 7, got {spatial_kernel}")
        if maps not in MAP_KINDS:
            raise ValueError(f"CBAM maps must be one of {MAP_KINDS}, got {maps!r}")
        if backend is not None:
            backends.check_name(backend)
        hidden = max(channels // reduction, 1)
        self.channels, self.spatial_kernel, self.maps, self.backend = channels, spatial_kernel, maps, backend
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # every backend, torch included, refuses what the fused ones cannot take (an integer x, an empty H or W, x
        # of another dtype than the weights, also in an empty batch) with the same error, rather than with
        # whatever error PyTorch meets first, or none
        who = f"CBAM({self.channels})"
        check_x(x, who)
        if x.shape[1] != self.channels:
            raise ValueError(f"{who} expects x of shape (B,{self.channels},H,W), got {tuple(x.shape)}")
        name = backends.resolve_constant(self.backend, x.device.type)
        k = self.spatial_kernel
        weights = self.mlp[0].weight.flatten(1), self.mlp[2].weight.flatten(1), self.spatial.weight.view(2, k, k)
        check_dtypes(x, dict(zip(("w1", "w2", "ws"), weights, strict=True)), who)
        y, a_c, a_s = cbam_ref(x, *weights) if name == "torch" else cbam_op(x, *weights, name)
        if self.maps == "sigmoid":
            return y, torch.sigmoid(a_c), torch.sigmoid(a_s)
        return y, a_c, a_s

    def extra_repr(self) -> str:
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        return f"channels={self.channels}, spatial_kernel={self.spatial_kernel}, maps={self.maps!r}{backend}"


def check_map_pairs(teacher_maps: Sequence[MapPair], student_maps: Sequence[MapPair]) -> None:
    """Two models' maps, one ``(channel (B,C), spatial (B,1,H,W))`` pair per CBAM block: the same non-zero number
    of blocks, and per map what :func:`askd.ops.cosine_distill.check_maps` asks (shape, batch, device, dtype);
    a ValueError naming the block and the map otherwise."""
    if not (isinstance(teacher_maps, Sequence) and isinstance(student_maps, Sequence)):
        raise TypeError(f"expected a list of (channel_map, spatial_map) pairs from each model, got "
                        f"{type(teacher_maps).__name__} and {type(student_maps).__name__}")
    if len(teacher_maps) != len(student_maps) or not teacher_maps:
        raise ValueError(
            f"teacher and student must give the same non-zero number of CBAM blocks, "
            f"got {len(teacher_maps)} and {len(student_maps)}"
        )
    for i, (tp, sp) in enumerate(zip(teacher_maps, student_maps, strict=True)):
        # a tensor is no Sequence: a (2, B, C) tensor is not read as a pair of maps
        if not all(isinstance(p, Sequence) and len(p) == 2 for p in (tp, sp)):
            raise ValueError(f"block {i}: expected a (channel_map, spatial_map) pair from each model")
    names = [f"block {i} {kind} map" for i in range(len(student_maps)) for kind in KINDS]
    check_maps([m for pair in teacher_maps for m in pair], [m for pair in student_maps for m in pair], names)
