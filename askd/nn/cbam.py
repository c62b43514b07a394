"""CBAM: channel then spatial attention that also returns its maps (Woo et al., ECCV 2018).

A-SKD distils these maps, so the module returns them from ``forward`` instead of exposing them
through hooks. Shapes: x (B,C,H,W) -> y (B,C,H,W), channel_map (B,C), spatial_map (B,1,H,W).

    channel logits  a_c = MLP(avgpool_hw(x)) + MLP(maxpool_hw(x))      MLP = 1x1 conv, ReLU, 1x1 conv
    x_c             = x * sigmoid(a_c)
    spatial logits  a_s = conv_kxk(cat(mean_c(x_c), max_c(x_c)))      no bias, no BN
    y               = x_c * sigmoid(a_s)

``maps="logits"`` returns (a_c, a_s) as the authors' code distils them; ``maps="sigmoid"`` returns
(sigmoid(a_c), sigmoid(a_s)) as the paper's text describes.

``backend`` picks the implementation (:mod:`askd.backend`): ``"torch"`` runs the modules below, ``"triton"``
and ``"ext"`` the fused op :func:`askd.ops.cbam` (same formula; its maps come back in float32, float64 for
float64 input), ``"auto"`` the fastest available; None means ``$ASKD_BACKEND`` or ``"torch"``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backend as backends
from ..ops.cbam import cbam as cbam_op

MAP_KINDS = ("logits", "sigmoid")


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
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CBAM({self.channels}) expects x of shape (B,{self.channels},H,W), got {tuple(x.shape)}")
        name = backends.resolve_constant(self.backend, x.device.type)
        if name == "torch":
            y, a_c, a_s = self._reference(x)
        else:
            y, a_c, a_s = self._fused(x, name)
        if self.maps == "sigmoid":
            return y, torch.sigmoid(a_c), torch.sigmoid(a_s)
        return y, a_c, a_s

    def _fused(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1, w2 = self.mlp[0].weight, self.mlp[2].weight
        k = self.spatial_kernel
        return cbam_op(x, w1.flatten(1), w2.flatten(1), self.spatial.weight.view(2, k, k), name)

    def _reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        avg = x.mean(dim=(2, 3), keepdim=True)
        # max with indices (not amax) so the gradient goes to one element, as in the authors' pooling
        mx = x.flatten(2).max(dim=2).values[..., None, None]
        a_c = self.mlp(avg) + self.mlp(mx)  # (B,C,1,1)
        x_c = x * torch.sigmoid(a_c)
        pooled = torch.cat([x_c.mean(dim=1, keepdim=True), x_c.max(dim=1, keepdim=True).values], dim=1)
        a_s = self.spatial(pooled)  # (B,1,H,W)
        return x_c * torch.sigmoid(a_s), a_c.flatten(1), a_s

    def extra_repr(self) -> str:
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        return f"channels={self.channels}, spatial_kernel={self.spatial_kernel}, maps={self.maps!r}{backend}"
