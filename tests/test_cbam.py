"""The CBAM module against its op's formula (askd.ops.cbam.cbam_ref) and a case worked by hand: values, maps,
gradients, memory format, odd sizes."""

from __future__ import annotations

import math

import pytest
import torch

from askd.nn import CBAM
from askd.ops.cbam import cbam_ref


def reference(x, w1, w2, ws, kind):
    """The op's formula (:func:`askd.ops.cbam.cbam_ref`, ws (1,2,k,k) here as the module holds it) with the maps
    of ``kind``: the module must wire its weights and its ``maps`` option to it."""
    y, a_c, a_s = cbam_ref(x, w1, w2, ws[0])
    if kind == "sigmoid":
        return y, torch.sigmoid(a_c), torch.sigmoid(a_s)
    return y, a_c, a_s


def test_formula_on_a_case_worked_by_hand():
    """C = 1, w1 = w2 = 1, a zero spatial conv: a_c = relu(c) + relu(c) = 2c for a constant c > 0, so
    y = c * sigmoid(2c) * sigmoid(0) everywhere; the reference, and the module on its weights, give exactly that."""
    m = CBAM(1, reduction=1, spatial_kernel=3).double()
    with torch.no_grad():
        m.mlp[0].weight.fill_(1.0)
        m.mlp[2].weight.fill_(1.0)
        m.spatial.weight.zero_()
    c = 0.75
    x = torch.full((2, 1, 3, 4), c, dtype=torch.float64)
    want_y = c * (1 / (1 + math.exp(-2 * c))) * 0.5
    for y, a_c, a_s in (m(x), reference(x, *weights_of(m), "logits")):
        torch.testing.assert_close(y, torch.full_like(x, want_y), rtol=1e-14, atol=0)
        torch.testing.assert_close(a_c, torch.full((2, 1), 2 * c, dtype=torch.float64), rtol=1e-14, atol=0)
        assert (a_s == 0).all()


def weights_of(m: CBAM, requires_grad: bool = False):
    w1 = m.mlp[0].weight.detach().clone().flatten(1)
    w2 = m.mlp[2].weight.detach().clone().flatten(1)
    ws = m.spatial.weight.detach().clone()
    return [w.requires_grad_(requires_grad) for w in (w1, w2, ws)]


def make(channels, k, kind, reduction=16, dtype=torch.float64, scale=1.0):
    torch.manual_seed(0)
    m = CBAM(channels, reduction=reduction, spatial_kernel=k, maps=kind).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("kind", ["logits", "sigmoid"])
def test_forward_matches_reference(k, kind):
    m = make(32, k, kind, reduction=4, scale=3.0)
    torch.manual_seed(1)
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64) * 2
    y, cmap, smap = m(x)
    ry, rc, rs = reference(x, *weights_of(m), kind)
    assert y.shape == x.shape and cmap.shape == (2, 32) and smap.shape == (2, 1, 9, 11)
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cmap, rc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(smap, rs, rtol=1e-10, atol=1e-12)
    if kind == "sigmoid":
        assert (cmap > 0).all() and (cmap < 1).all() and (smap > 0).all() and (smap < 1).all()
    else:
        # logits: outside (0,1) somewhere, which a sigmoid cannot produce
        assert (cmap < 0).any() or (cmap > 1).any()
        assert (smap < 0).any() or (smap > 1).any()


@pytest.mark.parametrize("k", [3, 7])
def test_logit_and_sigmoid_kinds_agree(k):
    """Same weights: the sigmoid maps are the sigmoid of the logit maps and y is identical."""
    a = make(16, k, "logits", reduction=4)
    b = make(16, k, "sigmoid", reduction=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    ya, ca, sa = a(x)
    yb, cb, sb = b(x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(cb, 1 / (1 + torch.exp(-ca)))
    torch.testing.assert_close(sb, 1 / (1 + torch.exp(-sa)))


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("kind", ["logits", "sigmoid"])
def test_gradients_match_reference(k, kind):
    m = make(24, k, kind, reduction=4, scale=2.0)
    torch.manual_seed(2)
    x = torch.randn(2, 24, 7, 8, dtype=torch.float64)
    gy = torch.randn(2, 24, 7, 8, dtype=torch.float64)
    gc = torch.randn(2, 24, dtype=torch.float64)
    gs = torch.randn(2, 1, 7, 8, dtype=torch.float64)

    x1 = x.clone().requires_grad_()
    y, c, s = m(x1)
    ((y * gy).sum() + (c * gc).sum() + (s * gs).sum()).backward()

    x2 = x.clone().requires_grad_()
    w1, w2, ws = weights_of(m, requires_grad=True)
    ry, rc, rs = reference(x2, w1, w2, ws, kind)
    ((ry * gy).sum() + (rc * gc).sum() + (rs * gs).sum()).backward()

    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.mlp[0].weight.grad.flatten(1), w1.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.mlp[2].weight.grad.flatten(1), w2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.spatial.weight.grad, ws.grad, rtol=1e-9, atol=1e-11)
    assert x1.grad.abs().sum() > 0 and m.spatial.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["logits", "sigmoid"])
def test_channels_last_input_same_output(kind):
    m = make(32, 3, kind, dtype=torch.float32)
    torch.manual_seed(3)
    x = torch.randn(2, 32, 10, 10)
    xc = x.to(memory_format=torch.channels_last)
    assert xc.is_contiguous(memory_format=torch.channels_last) and not xc.is_contiguous()
    for a, b in zip(m(x), m(xc), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("kind", ["logits", "sigmoid"])
def test_batch_one_and_odd_sizes(k, kind):
    m = make(7, k, kind, reduction=16)
    assert m.mlp[0].out_channels == 1 and m.mlp[2].in_channels == 1  # max(7 // 16, 1)
    torch.manual_seed(4)
    x = torch.randn(1, 7, 5, 3, dtype=torch.float64)
    y, c, s = m(x)
    assert y.shape == (1, 7, 5, 3) and c.shape == (1, 7) and s.shape == (1, 1, 5, 3)
    for got, want in zip((y, c, s), reference(x, *weights_of(m), kind), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_hidden_width():
    assert CBAM(64).mlp[0].out_channels == 4
    assert CBAM(64, reduction=8).mlp[0].out_channels == 8
    assert CBAM(15).mlp[0].out_channels == 1


def test_no_bias_anywhere():
    m = CBAM(32, spatial_kernel=7)
    assert m.mlp[0].bias is None and m.mlp[2].bias is None and m.spatial.bias is None
    assert m.spatial.weight.shape == (1, 2, 7, 7)
    assert m.spatial.padding == (3, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": 8, "spatial_kernel": 5},
        {"channels": 8, "spatial_kernel": 1},
        {"channels": 8, "maps": "foo"},
        {"channels": 0},
        {"channels": 8, "reduction": 0},
    ],
)
def test_bad_constructor_args_raise(kwargs):
    with pytest.raises(ValueError):
        CBAM(**kwargs)


@pytest.mark.parametrize("shape", [(2, 9, 4, 4), (8, 4, 4), (1, 8, 4)])
def test_bad_input_raises(shape):
    with pytest.raises(ValueError):
        CBAM(8)(torch.zeros(shape))
