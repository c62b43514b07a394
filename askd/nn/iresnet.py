"""IR-ResNet with one CBAM per residual block (InsightFace "improved ResNet", as in the A-SKD code).

Input x (B,3,112,112) in [-1,1]. ``forward`` returns ``(embedding, maps)``: embedding (B,E) and
``maps``, one ``(channel_map (B,C), spatial_map (B,1,H,W))`` tuple per CBAM block in forward order.
``forward(x, stages=True)`` returns ``(embedding, maps, stage_outputs)`` with the output of each of the four
stages (its last block's, after the residual add; (B,C_k,112/2^k,112/2^k)), what attention transfer
distils: returned by ``forward`` itself rather than caught with hooks, which DDP wrappers and
torch.compile do not see, and kept only when asked for.

Block (authors' ``BottleNeck_IR_CBAM``):
    res = BN -> conv3x3(stride 1) -> BN -> PReLU -> conv3x3(stride s) -> BN -> CBAM
    out = shortcut(x) + res        shortcut = conv1x1(stride s) + BN in a stage's first block, else identity
No activation after the add. Stem conv3x3(3->w0) + BN + PReLU, no max-pool; every stage starts with
stride 2 (112 -> 56 -> 28 -> 14 -> 7). Head BN2d -> Dropout -> Flatten -> Linear(C*7*7 -> E) -> BN1d; the
dropout is :class:`~askd.nn.dropout.ShareDropout`, nn.Dropout in one process and the same draws in many. The
PReLUs are :class:`~askd.nn.prelu.PReLU` (nn.PReLU's weights) with the CBAMs' backend: ``ext`` runs their
backward as one compiled pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cbam import CBAM
from .dropout import ShareDropout
from .inputs import check_images
from .prelu import PReLU

Maps = list[tuple[torch.Tensor, torch.Tensor]]


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution without bias, ``nn.Conv2d(in_ch, out_ch, 1, stride)`` in weights and results.

    On CPUs a stride-s 1x1 convolution runs as its exact equivalent, a stride-s subsample followed by a
    stride-1 1x1 convolution: the backward of oneDNN's strided 1x1 convolution (torch 2.13) corrupts the heap
    with 8 channels at 112x112 (``ir_tiny_cbam``'s stage-1 shortcut): in bf16 on AVX-512 CPUs without AMX
    (e.g. AMD Zen 4; the weights gradient) and in float32 channels_last on Sapphire Rapids (the input
    gradient). Both read the same input pixels and weights, so outputs and gradients are the same sums.
    GPUs keep the strided convolution. x (B,Cin,H,W) -> (B,Cout,ceil(H/s),ceil(W/s)). Built without bias; one
    added later (:func:`askd.nn.fold.fold_batchnorms`) is added on both paths.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.stride == (1, 1):
            return super().forward(x)
        # the subsample keeps x's memory format, so the convolution (and its output) keeps it too
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        sub = x[:, :, :: self.stride[0], :: self.stride[1]].contiguous(memory_format=layout)
        return F.conv2d(sub, self.weight, self.bias)  # a bias only where askd.nn.fold folded a BN into it


class IRBlockCBAM(nn.Module):
    """One improved residual block with CBAM before the residual add. x (B,Cin,H,W) -> (B,Cout,H/s,W/s)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, cbam: dict):
        super().__init__()
        self.res = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            PReLU(out_ch, backend=cbam.get("backend")),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.cbam = CBAM(out_ch, **cbam)
        # The authors give every stage-opening block a projection, even where in_ch == out_ch.
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(PointwiseConv(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        res, channel_map, spatial_map = self.cbam(self.res(x))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return shortcut + res, channel_map, spatial_map


class IResNetCBAM(nn.Module):
    """IR-ResNet backbone returning ``(embedding, maps)``.

    Args:
        blocks: residual blocks per stage, e.g. (3, 4, 14, 3) for IR-50.
        widths: stem width followed by the four stage widths, e.g. (64, 64, 128, 256, 512).
        embedding_size: E.
        dropout: head dropout (0.4 in the authors' code).
        cbam: keyword arguments for every :class:`CBAM` (reduction, spatial_kernel, maps).
        input_size: side of the square input; the head expects ``input_size / 16`` at the last stage.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int] = (64, 64, 128, 256, 512),
        embedding_size: int = 512,
        dropout: float = 0.4,
        cbam: dict | None = None,
        input_size: int = 112,
    ):
        super().__init__()
        if len(blocks) != 4 or len(widths) != 5:
            raise ValueError(f"need 4 stage block counts and 5 widths, got {list(blocks)} and {list(widths)}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        cbam = dict(cbam or {})
        self.input_size = input_size
        stem = widths[0]
        prelu = PReLU(stem, backend=cbam.get("backend"))
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), prelu)
        layers = []
        for stage, n in enumerate(blocks):
            in_ch, out_ch = widths[stage], widths[stage + 1]
            for i in range(n):
                layers.append(IRBlockCBAM(in_ch if i == 0 else out_ch, out_ch, 2 if i == 0 else 1, cbam))
        self.blocks = nn.ModuleList(layers)
        self.stage_ends = tuple(sum(blocks[: k + 1]) - 1 for k in range(4))  # index of each stage's last block
        side = input_size // 16
        self.head = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            ShareDropout(dropout),
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform conv/linear weights, zero biases, BN to identity (the authors' init)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, stages: bool = False):
        """x (B,3,S,S) -> (embedding (B,E), maps), or with ``stages`` (embedding, maps, [4 stage outputs])."""
        check_images(x, self.stem[0].weight, side=self.input_size)
        x = self.stem(x)
        maps: Maps = []
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, channel_map, spatial_map = block(x)
            maps.append((channel_map, spatial_map))
            if stages and i in self.stage_ends:
                outputs.append(x)
        if stages:
            return self.head(x), maps, outputs
        return self.head(x), maps
