"""askd.nn.fold_batchnorms: the folded copy of a face or classify model computes what the model computes in eval
mode (embedding or logits, maps, stage outputs), also channels_last; every BN after a conv or Linear is gone, the
pre-conv BNs stay; the model itself is left alone; the training pipeline's teacher forward uses the copy."""

import pytest
import torch
from torch import nn

from askd import models
from askd.config import Config
from askd.nn import fold_batchnorms
from askd.train import teacher_forward

BatchNorm = nn.modules.batchnorm._BatchNorm
# fp32 tolerance: max |folded - model| <= REL x the tensor's largest |value|, for every output tensor. Measured on a
# 2-core AMD EPYC (torch 2.13, CPU), these cases: at most 4.5e-6 (ir18_cbam, 1.1e-5 absolute), 2.5e-6 for the
# others (with 512-d embeddings ir18_cbam gave 4.0e-6, 2.9e-5 absolute on an embedding of magnitude ~7). An
# elementwise rtol does not fit: entries near zero are sums of terms of the tensor's scale, so their absolute
# error is of that scale too.
REL = 2e-5

# (arch, variant, create's keywords, input side, BNs left after folding: the IR blocks' first BNs + the head's BN2d)
CASES = [
    ("ir_tiny_cbam", "official", {}, 112, 4 + 1),
    ("ir_tiny_cbam", "paper", {}, 112, 4 + 1),
    ("ir18_cbam", "official", {}, 112, 8 + 1),
    ("resnet_tiny_cbam", "official", {"num_classes": 10, "stem": "cifar"}, 32, 0),
    ("resnet18_cbam", "paper", {"num_classes": 10, "stem": "cifar"}, 32, 0),
]
# BNs of each before folding: IR 3 per block + 1 per shortcut (one per stage) + stem + head's two; ResNet (basic) 2
# per block + 1 per downsample (stages 2-4) + stem
BNS = {"ir_tiny_cbam": 4 * 3 + 4 + 3, "ir18_cbam": 8 * 3 + 4 + 3, "resnet_tiny_cbam": 4 * 2 + 3 + 1,
       "resnet18_cbam": 8 * 2 + 3 + 1}


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, BatchNorm) for m in model.modules())


def randomise_batchnorms(model: nn.Module, seed: int = 1) -> None:
    """Running statistics and affine parameters away from the identity init, so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def build(arch, variant, kw):
    torch.manual_seed(0)
    model = models.create(arch, variant, embedding_size=32, **kw)
    randomise_batchnorms(model)
    return model.eval()


def flat(out) -> list[torch.Tensor]:
    """(first, maps, stages) -> one list of tensors in order."""
    first, maps, stages = out
    return [first, *(m for pair in maps for m in pair), *stages]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("arch, variant, kw, side, left", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_folded_model_computes_the_same(arch, variant, kw, side, left, channels_last):
    model = build(arch, variant, kw)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorms(model)

    # folding happened: the expected BNs are gone, the convs took their biases
    assert batchnorms(model) == BNS[arch] and batchnorms(folded) == left
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    kinds = {(p.device, p.dtype) for p in model.parameters()}
    assert {(p.device, p.dtype) for p in folded.parameters()} == kinds  # the new biases too
    if channels_last:
        # the weights keep their memory format
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in folded.modules() if isinstance(m, nn.Conv2d))
    # the model itself: unchanged weights and modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == before.keys()

    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = model(x, stages=True), folded(x, stages=True)
        plain = folded(x)
    assert len(got) == 3 and len(got[1]) == len(want[1]) and len(got[2]) == len(want[2]) == 4
    assert len(plain) == 2 and torch.equal(plain[0], got[0])
    for g, w in zip(flat(got), flat(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        err = (g - w).abs().max().item()
        assert err <= REL * w.abs().max().item(), f"max error {err:.3g} at magnitude {w.abs().max().item():.3g}"


def test_the_model_in_training_mode_gives_an_eval_copy():
    model = build("ir_tiny_cbam", "official", {}).train()
    folded = fold_batchnorms(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not folded.training and not any(m.training for m in folded.modules())


def test_the_folded_layers_are_the_formula():
    """Stem conv: w' = w * gamma / sqrt(var + eps) per output channel, b' = beta - mean * gamma / sqrt(var + eps)."""
    model = build("ir_tiny_cbam", "official", {})
    folded = fold_batchnorms(model)
    conv, bn = model.stem[0], model.stem[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.stem[0].weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded.stem[0].bias, bn.bias - bn.running_mean * scale)
    assert isinstance(folded.stem[1], nn.Identity)
    # the head: the Linear's own bias is scaled too; the BN2d before the Linear stays
    linear, bn1d = model.head[3], model.head[4]
    scale = bn1d.weight / torch.sqrt(bn1d.running_var + bn1d.eps)
    torch.testing.assert_close(folded.head[3].bias, (linear.bias - bn1d.running_mean) * scale + bn1d.bias)
    assert isinstance(folded.head[0], nn.BatchNorm2d) and isinstance(folded.head[4], nn.Identity)
    # the IR block's first BN precedes a padded conv: kept
    assert all(isinstance(b.res[0], nn.BatchNorm2d) for b in folded.blocks)


def test_other_models_are_refused():
    with pytest.raises(ValueError, match=r"\(IResNetCBAM or ResNetCBAM\), got Sequential"):
        fold_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model = build("ir_tiny_cbam", "official", {})
    with pytest.raises(ValueError, match="got OptimizedModule"):
        fold_batchnorms(torch.compile(model))


def test_the_students_teacher_forward_is_folded_unless_turned_off():
    teacher = build("ir_tiny_cbam", "official", {})
    runs_as = teacher_forward(Config(), teacher)
    assert runs_as is not teacher and batchnorms(runs_as) == 5 and batchnorms(teacher) == BNS["ir_tiny_cbam"]
    assert teacher_forward(Config(fold_teacher=False), teacher) is teacher
    compiled = teacher_forward(Config(compile=True), teacher)
    assert batchnorms(compiled._orig_mod) == 5
