"""BatchNorm folding for frozen models: a copy whose convolutions (and the face head's Linear) carry the BNs after them.

An eval-mode BatchNorm is a per-channel affine map of running statistics, so a BN right after a convolution or a
Linear folds into that layer's weights and bias, per output channel c::

    s_c  = gamma_c / sqrt(running_var_c + eps)
    w'_c = w_c * s_c                             (conv: the whole (Cin,kh,kw) filter of c; Linear: row c)
    b'_c = (b_c - running_mean_c) * s_c + beta_c     (b_c = 0 for a layer without bias)

and the BN becomes ``nn.Identity``. Exact in real arithmetic; in float32 the outputs move by rounding only (w'
rounded once, the sums in another order): in tests/test_fold.py under 5e-6 of each output's largest value.

Only BNs after a layer fold. Two BNs before one stay: the IR block's first (BN -> conv3x3 with padding 1), because
folding a BN into the convolution after it is not exact across zero padding (the padded border would see the BN's
shift); and the face head's BN2d (-> Dropout -> Flatten -> Linear), which would fold forward exactly but is cheap
next to that Linear. The pairs are found from the module structure of the two model families
(:mod:`askd.nn.iresnet`, :mod:`askd.nn.resnet`), not by tracing:

    IResNetCBAM   stem conv -> BN; every block's res conv3x3 -> BN (both), shortcut 1x1 conv -> BN; head Linear -> BN1d
    ResNetCBAM    stem conv1 -> bn1; every block's conv_k -> bn_k, downsample 1x1 conv -> BN

Running statistics are what folding uses, so a folded model is for inference only: :func:`fold_batchnorms` always
returns an eval-mode copy without gradients, whatever mode the model is in (training it would train neither the
BNs, which are gone, nor what they computed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from .iresnet import IRBlockCBAM, IResNetCBAM
from .resnet import BasicBlockCBAM, BottleneckCBAM, ResNetCBAM

Pair = tuple[nn.Module, str, str]  # (parent, name of the conv or Linear, name of the BN after it)


def _pairs(model: nn.Module) -> Iterator[Pair]:
    """Every (parent, layer, BN) of ``model`` whose BN directly follows the layer in the forward pass."""
    if isinstance(model, IResNetCBAM):
        yield model.stem, "0", "1"
        for block in model.blocks:
            if not isinstance(block, IRBlockCBAM):
                raise ValueError(f"fold_batchnorms: unknown block {type(block).__name__} in IResNetCBAM")
            # res = BN -> conv -> BN -> PReLU -> conv -> BN: the first BN precedes a padded conv and stays
            yield block.res, "1", "2"
            yield block.res, "4", "5"
            if block.shortcut is not None:
                yield block.shortcut, "0", "1"
        yield model.head, "3", "4"  # BN2d -> Dropout -> Flatten -> Linear -> BN1d: the BN1d
    elif isinstance(model, ResNetCBAM):
        yield model, "conv1", "bn1"
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                if not isinstance(block, (BasicBlockCBAM, BottleneckCBAM)):
                    raise ValueError(f"fold_batchnorms: unknown block {type(block).__name__} in ResNetCBAM")
                for k in (1, 2, 3) if isinstance(block, BottleneckCBAM) else (1, 2):
                    yield block, f"conv{k}", f"bn{k}"
                if block.downsample is not None:
                    yield block.downsample, "0", "1"
    else:
        raise ValueError(
            f"fold_batchnorms takes an askd.models.create model (IResNetCBAM or ResNetCBAM), got {type(model).__name__}"
            " (unwrap a compiled or DistributedDataParallel model first)"
        )


@torch.no_grad()
def _fold(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm, where: str) -> None:
    """Fold ``bn`` into ``layer`` in place (see the module docstring); the weight keeps its strides (memory format)."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"fold_batchnorms: expected a Conv2d or Linear followed by a BatchNorm at {where}, got "
                         f"{type(layer).__name__} -> {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fold_batchnorms: the BatchNorm at {where} keeps no running statistics; nothing to fold")
    weight = layer.weight
    # the per-channel terms in at least float32 (float64 for float64 weights), rounded once into the weights' dtype
    acc = torch.promote_types(weight.dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    bias = layer.bias.to(acc) if layer.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.to(acc)) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    # copy_ into the existing tensor keeps its strides: a channels_last weight stays channels_last
    weight.copy_(weight.to(acc) * scale.view(-1, *([1] * (weight.dim() - 1))))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
    else:
        layer.bias.copy_(shift)


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (an :func:`askd.models.create` model) with every BatchNorm that follows a convolution or
    a Linear folded into it and replaced by ``nn.Identity``; in eval mode, without gradients. ``model`` is left as
    it is.

    For inference only (the fold uses the running statistics; see the module docstring for the formula and what
    is left unfolded). The copy's ``forward`` returns what the model's does in eval mode, (embedding or logits,
    maps) and with ``stages=True`` the stage outputs, equal up to float rounding. The parameters keep their
    device, dtype and memory format; each folded layer gains a bias.
    """
    folded = copy.deepcopy(model)
    for parent, layer_name, bn_name in list(_pairs(folded)):
        where = f"{type(parent).__name__}.{layer_name} -> .{bn_name}"
        _fold(getattr(parent, layer_name), getattr(parent, bn_name), where)
        setattr(parent, bn_name, nn.Identity())
    # last: the Identities and the new biases are modules and parameters too
    return folded.eval().requires_grad_(False)
