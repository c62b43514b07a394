"""Backbone registry: shapes of embeddings and attention maps, parameter counts, variants, init, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from askd import models
from askd.nn import CBAM

ALL_NAMES = ["ir100_cbam", "ir18_cbam", "ir34_cbam", "ir50_cbam", "ir_tiny_cbam"]
BLOCKS = {"ir18_cbam": 8, "ir34_cbam": 16, "ir50_cbam": 24, "ir100_cbam": 49, "ir_tiny_cbam": 4}
PER_STAGE = {
    "ir18_cbam": (2, 2, 2, 2),
    "ir34_cbam": (3, 4, 6, 3),
    "ir50_cbam": (3, 4, 14, 3),
    "ir100_cbam": (3, 13, 30, 3),
    "ir_tiny_cbam": (1, 1, 1, 1),
}
SIDES = (56, 28, 14, 7)


def expected_stage_widths(name: str) -> tuple[int, ...]:
    if name == "ir_tiny_cbam":
        return tuple(models.ARCHS[name][1][1:])
    return (64, 128, 256, 512)


@pytest.fixture(scope="module", params=[(n, v) for n in ALL_NAMES for v in ("official", "paper")], ids=str)
def built(request):
    """(name, variant, model, embedding, maps) for x (1,3,112,112), built and run once per (name, variant)."""
    name, variant = request.param
    torch.manual_seed(0)
    model = models.create(name, variant).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        emb, maps = model(x)
    return name, variant, model, emb, maps


def test_names_are_the_documented_set():
    assert models.names("face") == sorted(ALL_NAMES)
    assert models.names() == sorted(models.names())


def test_embedding_shape_and_finite(built):
    _, _, _, emb, _ = built
    assert emb.shape == (1, 512)
    assert emb.dtype == torch.float32
    assert torch.isfinite(emb).all()


def test_number_of_maps_is_number_of_blocks(built):
    name, _, model, _, maps = built
    assert len(maps) == BLOCKS[name]
    assert sum(PER_STAGE[name]) == BLOCKS[name]
    assert len(model.blocks) == BLOCKS[name]
    assert sum(isinstance(m, CBAM) for m in model.modules()) == BLOCKS[name]


def test_map_shapes_follow_stages(built):
    name, _, _, _, maps = built
    widths = expected_stage_widths(name)
    expected = []
    for stage, n in enumerate(PER_STAGE[name]):
        expected += [(widths[stage], SIDES[stage])] * n
    assert len(expected) == len(maps)
    for i, ((channel_map, spatial_map), (c, side)) in enumerate(zip(maps, expected, strict=True)):
        assert isinstance(channel_map, torch.Tensor) and isinstance(spatial_map, torch.Tensor)
        assert channel_map.shape == (1, c), f"block {i}"
        assert spatial_map.shape == (1, 1, side, side), f"block {i}"
        assert torch.isfinite(channel_map).all() and torch.isfinite(spatial_map).all()


def test_variant_sets_kernel_and_map_kind(built):
    _, variant, model, _, maps = built
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    k = 3 if variant == "official" else 7
    for m in cbams:
        assert m.spatial.kernel_size == (k, k)
        assert m.spatial.padding == (k // 2, k // 2)
        assert m.maps == ("logits" if variant == "official" else "sigmoid")
    values = torch.cat([t.flatten() for pair in maps for t in pair])
    if variant == "paper":
        assert (values > 0).all() and (values < 1).all()
    else:
        # pre-sigmoid logits: some are negative, which no sigmoid output can be
        assert (values < 0).any()


def test_no_forward_hooks(built):
    _, _, model, _, _ = built
    for m in model.modules():
        assert len(m._forward_hooks) == 0, m
        assert len(m._forward_pre_hooks) == 0, m
        assert len(m._backward_hooks) == 0, m
    from torch.nn.modules import module as module_mod

    assert len(module_mod._global_forward_hooks) == 0
    assert len(module_mod._global_forward_pre_hooks) == 0


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_by_hand(name: str, variant: str) -> int:
    """The parameter count written out from the block description in askd.nn.iresnet / askd.nn.cbam."""
    k = 3 if variant == "official" else 7
    blocks, widths = models.ARCHS[name][:2]
    reduction = models.ARCHS[name][2] if len(models.ARCHS[name]) > 2 else 16

    def cbam(c):
        h = max(c // reduction, 1)
        return c * h + h * c + 2 * k * k  # two bias-free 1x1 convs + the 2->1 spatial conv

    def block(cin, cout, proj):
        n = 2 * cin + cin * cout * 9 + 2 * cout + cout + cout * cout * 9 + 2 * cout + cbam(cout)
        if proj:
            n += cin * cout + 2 * cout
        return n

    w0 = widths[0]
    total = 3 * w0 * 9 + 2 * w0 + w0  # stem conv, BN, PReLU
    for stage, n in enumerate(blocks):
        cin, cout = widths[stage], widths[stage + 1]
        total += block(cin, cout, True) + (n - 1) * block(cout, cout, False)
    c = widths[-1]
    total += 2 * c + c * 49 * 512 + 512 + 2 * 512  # head BN2d, Linear(+bias), BN1d
    return total


def test_parameter_count(built):
    name, variant, model, _, _ = built
    assert num_params(model) == count_by_hand(name, variant)
    if (name, variant) == ("ir50_cbam", "official"):
        # the authors' CBAMResNet(50) with feature_dim=512
        assert num_params(model) == 43_814_000
        assert sum(isinstance(m, CBAM) for m in model.modules()) == 24
    if (name, variant) == ("ir50_cbam", "paper"):
        # only the 24 spatial convs grow from 3x3 to 7x7 (2 in-channels, 1 out, no bias)
        assert num_params(model) == 43_814_000 + 24 * 2 * (49 - 9)
    if (name, variant) == ("ir100_cbam", "official"):
        assert num_params(model) == 65_529_266


def test_ir_nets_use_reduction_16_and_keyword_overrides():
    torch.manual_seed(0)
    model = models.create("ir18_cbam", "official")
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert [m.mlp[0].out_channels for m in cbams] == [c // 16 for c in (64, 64, 128, 128, 256, 256, 512, 512)]
    tiny = models.create("ir_tiny_cbam", "official", reduction=2)
    widths = models.ARCHS["ir_tiny_cbam"][1][1:]
    assert [m.mlp[0].out_channels for m in tiny.modules() if isinstance(m, CBAM)] == [c // 2 for c in widths]


def test_embedding_size_keyword():
    torch.manual_seed(0)
    model = models.create("ir_tiny_cbam", "paper", embedding_size=128).eval()
    with torch.no_grad():
        emb, maps = model(torch.randn(2, 3, 112, 112))
    assert emb.shape == (2, 128)
    assert model.head[3].out_features == 128
    assert len(maps) == 4 and maps[0][0].shape == (2, models.ARCHS["ir_tiny_cbam"][1][1])


def test_batch_of_two_train_mode_and_backward():
    torch.manual_seed(0)
    model = models.create("ir_tiny_cbam", "official").train()
    x = torch.randn(2, 3, 112, 112)
    emb, maps = model(x)
    assert emb.shape == (2, 512)
    (emb.square().mean() + sum(c.mean() + s.mean() for c, s in maps)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 112, 112), (1, 1, 112, 112), (1, 3, 112, 111)])
def test_wrong_input_shape_raises(shape):
    model = models.create("ir_tiny_cbam").eval()
    with pytest.raises(ValueError):
        model(torch.zeros(shape))


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as exc:
        models.create("resnet50")
    for name in ALL_NAMES:
        assert name in str(exc.value)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError) as exc:
        models.create("ir_tiny_cbam", "nope")
    assert "official" in str(exc.value) and "paper" in str(exc.value)
    with pytest.raises(ValueError):
        models.check_variant("Official")


def test_init_biases_zero_bn_identity_xavier_bounds():
    torch.manual_seed(0)
    model = models.create("ir_tiny_cbam", "official")
    n_conv = n_bn = n_lin = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias))
            w = m.weight
            fan_in = w.shape[1] * w[0, 0].numel()
            fan_out = w.shape[0] * w[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound + 1e-7
            if w.numel() > 1000:  # a uniform draw fills most of its range
                assert w.abs().max() > 0.9 * bound
            n_conv += isinstance(m, nn.Conv2d)
            n_lin += isinstance(m, nn.Linear)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            n_bn += 1
    assert n_lin == 1 and n_conv > 0 and n_bn > 0
    linear = model.head[3]
    assert linear.bias is not None and torch.equal(linear.bias, torch.zeros(512))
