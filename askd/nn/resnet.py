"""ResNet with one CBAM per residual block: the classifiers of the A-SKD paper's section 5.1 (LR image classification).

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018: torchvision's ResNet (v1.5) with a CBAM
on the residual branch of every block, after its last BN and before the add, 7x7 spatial conv::

    basic:       res = conv3x3(stride s) -> BN -> ReLU -> conv3x3 -> BN -> CBAM                  out = C
    bottleneck:  res = conv1x1 -> BN -> ReLU -> conv3x3(stride s) -> BN -> ReLU -> conv1x1 -> BN -> CBAM
                                                                                          out = 4 x base width
    out = ReLU(shortcut(x) + res)       shortcut = conv1x1(stride s) + BN where the shape changes, else identity

Stems: ``imagenet`` conv7x7/2 + BN + ReLU + maxpool 3x3/2 (total stride 32: 224 -> 7), ``cifar`` conv3x3/1 + BN +
ReLU without max-pool (total stride 8: 32 -> 4). Four stages with strides 1, 2, 2, 2, global average pool,
Linear(C_out -> num_classes). Module names follow torchvision (conv1, bn1, layer1..layer4, downsample, fc), so a
torchvision ResNet's state dict loads with ``strict=False``, missing only the ``cbam`` weights.

``forward(x)`` returns ``(logits (B,N), maps)``, ``maps`` one ``(channel_map (B,C), spatial_map (B,1,h,w))`` per
block in forward order, as :mod:`askd.nn.iresnet`; ``stages=True`` appends the four stage outputs (each stage's
last block's, after the add and ReLU); ``features=True`` returns the pooled features (B,C_out) in place of the
logits, and :meth:`ResNetCBAM.forward_head` maps them to the logits. Both come from ``forward`` itself rather
than hooks, which DDP wrappers and torch.compile do not see.

The CBAM is A-SKD's op (:class:`askd.nn.CBAM`), not Woo et al.'s released module (Jongchan/attention-module):
theirs has biases in the channel MLP (two Linear layers), a BN after the spatial conv, and pools (max, mean) over
channels in that order; ours has a bias-free MLP of 1x1 convs, a bias-free spatial conv without BN, and pools
(mean, max). So per block ours has 2*C*C/r + 2*7*7 weights, theirs C/r + C more plus the BN's two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cbam import CBAM
from .inputs import check_images
from .iresnet import Maps, PointwiseConv

# stem -> the net's total stride, the smallest input side it takes: a smaller input would still run (every stride
# rounds up), but its last stages would see one pixel framed in zero padding
STEMS = {"imagenet": 32, "cifar": 8}
BLOCKS = ("basic", "bottleneck")


class _BlockCBAM(nn.Module):
    """What both blocks share: the shortcut, the CBAM on the residual branch, the add and the ReLU."""

    expansion = 1

    def attach(self, in_ch: int, out_ch: int, stride: int, cbam: dict) -> None:
        """Add the CBAM and the shortcut: called last by each block's ``__init__``, so the state dict lists the
        convolutions first, in torchvision's order."""
        self.cbam = CBAM(out_ch, **cbam)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            # PointwiseConv: the CPU workaround for oneDNN's strided 1x1 convolution (askd.nn.iresnet)
            self.downsample = nn.Sequential(PointwiseConv(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch up to its last BN: x (B,Cin,H,W) -> (B,Cout,H/s,W/s)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,Cin,H,W) -> (out (B,Cout,H/s,W/s), channel_map (B,Cout), spatial_map (B,1,H/s,W/s))."""
        res, channel_map, spatial_map = self.cbam(self.residual(x))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + res, inplace=True), channel_map, spatial_map


class BasicBlockCBAM(_BlockCBAM):
    """ResNet-18/34 block: two 3x3 convs (the first one strided), CBAM on ``width`` channels."""

    def __init__(self, in_ch: int, width: int, stride: int, cbam: dict):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.attach(in_ch, width * self.expansion, stride, cbam)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))


class BottleneckCBAM(_BlockCBAM):
    """ResNet-50/101 block (v1.5: the stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 to 4 x ``width``, CBAM on those."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, cbam: dict):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.attach(in_ch, width * self.expansion, stride, cbam)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return self.bn3(self.conv3(x))


class ResNetCBAM(nn.Module):
    """ResNet-CBAM classifier returning ``(logits, maps)``; see the module docstring.

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101).
        blocks: residual blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        widths: stem width followed by the four stages' base widths, e.g. (64, 64, 128, 256, 512); a bottleneck
            stage outputs 4x its base width.
        num_classes: N, the logits' width.
        stem: ``"imagenet"`` (7x7/2 conv + max-pool, inputs >= 32 px) or ``"cifar"`` (3x3/1 conv, inputs >= 8 px).
        cbam: keyword arguments for every :class:`CBAM` (reduction, spatial_kernel, maps, backend).
        zero_init_residual: zero each residual branch's last BN weight, so that every branch starts at zero
            (torchvision's option; its CBAM then sees zeros and passes zeros).

    Attributes: ``stage_channels`` the four stages' output C, ``num_features`` the last one (the features'
    width), ``min_side`` the smallest input side.
    """

    def __init__(
        self,
        block: str,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        stem: str = "imagenet",
        cbam: dict | None = None,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {list(BLOCKS)}")
        if len(blocks) != 4 or len(widths) != 5:
            raise ValueError(f"need 4 stage block counts and 5 widths, got {list(blocks)} and {list(widths)}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (the classes to predict), got {num_classes!r}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {list(STEMS)}")
        cbam = dict(cbam or {})
        make = BasicBlockCBAM if block == "basic" else BottleneckCBAM
        self.stem_kind, self.min_side = stem, STEMS[stem]
        w0 = widths[0]
        imagenet = stem == "imagenet"
        self.conv1 = nn.Conv2d(3, w0, 7, 2, 3, bias=False) if imagenet else nn.Conv2d(3, w0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
        in_ch, layers = w0, []
        for stage, n in enumerate(blocks):
            layer = []
            for i in range(n):
                layer.append(make(in_ch, widths[stage + 1], 2 if i == 0 and stage > 0 else 1, cbam))
                in_ch = widths[stage + 1] * make.expansion
            layers.append(nn.ModuleList(layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stage_channels = tuple(w * make.expansion for w in widths[1:])  # each stage's output C
        self.num_features = self.stage_channels[-1]
        self.fc = nn.Linear(self.num_features, num_classes)
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """torchvision's init: kaiming-normal (fan_out, ReLU) convs, BN to identity, the Linear's default init;
        the CBAMs keep nn.Conv2d's default init, as built."""
        in_cbam = {id(m) for c in self.modules() if isinstance(c, CBAM) for m in c.modules()}
        for m in self.modules():
            if id(m) in in_cbam:
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.fc.reset_parameters()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _BlockCBAM):  # the residual branch's last BN
                    nn.init.zeros_((m.bn3 if isinstance(m, BottleneckCBAM) else m.bn2).weight)

    def forward(self, x: torch.Tensor, stages: bool = False, features: bool = False):
        """x (B,3,H,W) -> (logits (B,N), maps); ``features``: (B,C_out) pooled features instead of the logits;
        ``stages``: a third item, the 4 stage outputs [(B,C_k,H/s_k,W/s_k)]."""
        check_images(x, self.conv1.weight, min_side=self.min_side, why=f" (the {self.stem_kind} stem's total stride)")
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        maps: Maps = []
        outputs: list[torch.Tensor] = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x, channel_map, spatial_map = block(x)
                maps.append((channel_map, spatial_map))
            if stages:
                outputs.append(x)
        pooled = x.mean(dim=(2, 3))  # global average pool
        first = pooled if features else self.forward_head(pooled)
        if stages:
            return first, maps, outputs
        return first, maps

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (B,C_out) -> logits (B,N): the final Linear."""
        return self.fc(features)
