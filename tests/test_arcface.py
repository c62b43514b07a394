"""ArcFace margin logits against the formula written out in the test."""

from __future__ import annotations

import math

import pytest
import torch

from askd.nn import ArcFace


def reference_logits(emb, weight, labels, s, m):
    """The margin rule written out in fp64 with per-element Python maths on the cosines."""
    e = emb.double()
    w = weight.double()
    e = e / e.pow(2).sum(dim=1, keepdim=True).sqrt()
    w = w / w.pow(2).sum(dim=1, keepdim=True).sqrt()
    cos = e @ w.t()
    out = torch.empty_like(cos)
    for b in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = float(cos[b, j])
            if j == int(labels[b]):
                if c > math.cos(math.pi - m):
                    sin = math.sqrt(max(1.0 - c * c, 0.0))
                    val = c * math.cos(m) - sin * math.sin(m)
                else:
                    val = c - math.sin(math.pi - m) * m
            else:
                val = c
            out[b, j] = s * val
    return out


@pytest.mark.parametrize("s,m", [(32.0, 0.5), (64.0, 0.35)])
def test_logits_match_formula(s, m):
    torch.manual_seed(0)
    head = ArcFace(16, 10, s=s, m=m)
    emb = torch.randn(6, 16) * 3
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    out = head(emb, labels)
    assert out.shape == (6, 10) and out.dtype == torch.float32
    want = reference_logits(emb, head.weight.detach(), labels, s, m)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5 * s)


def test_non_target_columns_are_scaled_cosine():
    torch.manual_seed(1)
    head = ArcFace(8, 5, s=30.0, m=0.5)
    emb = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 4])
    out = head(emb, labels).double()
    e = emb.double() / emb.double().norm(dim=1, keepdim=True)
    w = head.weight.detach().double()
    w = w / w.norm(dim=1, keepdim=True)
    cos = e @ w.t()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[torch.arange(4), labels] = False
    torch.testing.assert_close(out[mask], 30.0 * cos[mask], rtol=0, atol=1e-5)
    # the target column is lowered by the margin: cos(theta + m) < cos(theta) for theta in (0, pi - m)
    assert (out[~mask] < 30.0 * cos[~mask]).all()


def test_target_cos_below_threshold_uses_linear_fallback():
    """Weight row = -embedding gives cos = -1 <= cos(pi - m): the value is s * (-1 - sin(pi - m) * m)."""
    s, m = 32.0, 0.5
    torch.manual_seed(2)
    head = ArcFace(8, 3, s=s, m=m)
    emb = torch.randn(1, 8)
    with torch.no_grad():
        head.weight[1] = -emb[0] * 2.5
    out = head(emb, torch.tensor([1])).detach()
    want = s * (-1.0 - math.sin(math.pi - m) * m)
    assert abs(float(out[0, 1]) - want) < 1e-4
    # the unmodified cos(theta + m) would be cos(pi + m) = -cos(m): the fallback is not that
    assert abs(want - s * -math.cos(m)) > 1.0
    # non-target columns stay s * cos
    w = head.weight.detach().double()
    cos = (w @ emb[0].double()) / (w.norm(dim=1) * emb[0].double().norm())
    for j in (0, 2):
        assert abs(float(out[0, j]) - s * float(cos[j])) < 1e-4


def test_cosines_either_side_of_threshold():
    """Constructed cosines c = cos(a) via unit vectors: margin branch above cos(pi - m), linear branch below."""
    s, m = 10.0, 0.5
    head = ArcFace(2, 4, s=s, m=m)
    th = math.pi - m
    angles = [0.3, th - 0.05, th + 0.05, math.pi - 0.01]
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[math.cos(a), math.sin(a)] for a in angles]))
    emb = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    out = head(emb, torch.arange(4)).detach()
    for j, a in enumerate(angles):
        c = math.cos(a)
        want = s * (math.cos(a + m) if a < th else c - math.sin(math.pi - m) * m)
        assert abs(float(out[j, j]) - want) < 1e-4, (a, float(out[j, j]), want)


def test_target_logit_monotonic_in_angle():
    s, m = 1.0, 0.5
    head = ArcFace(2, 1, s=s, m=m)
    angles = torch.linspace(0.0, math.pi, 200, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float()
    out = head(emb, torch.zeros(200, dtype=torch.long))[:, 0]
    assert (out[1:] <= out[:-1] + 1e-6).all()


def test_bf16_under_autocast_gives_fp32():
    torch.manual_seed(3)
    head = ArcFace(16, 7)
    emb = torch.randn(4, 16).bfloat16()
    labels = torch.tensor([0, 6, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb, labels)
    assert out.dtype == torch.float32
    want = reference_logits(emb.float(), head.weight.detach(), labels, head.s, head.m)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4)


def test_gradient_reaches_embeddings_and_weight():
    torch.manual_seed(4)
    head = ArcFace(8, 5)
    emb = torch.randn(3, 8, requires_grad=True)
    torch.nn.functional.cross_entropy(head(emb, torch.tensor([0, 1, 2])), torch.tensor([0, 1, 2])).backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_shape_errors():
    head = ArcFace(8, 5)
    with pytest.raises(ValueError):
        head(torch.randn(3, 7), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        head(torch.randn(8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError):
        head(torch.randn(3, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        head(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        ArcFace(0, 5)
    with pytest.raises(ValueError):
        ArcFace(8, 0)


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_finite_when_embedding_parallel_to_a_weight_row(label, sign):
    torch.manual_seed(5)
    head = ArcFace(4, 2)
    with torch.no_grad():
        head.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    emb = torch.tensor([[3.0 * sign, 0.0, 0.0, 0.0]], requires_grad=True)
    logits = head(emb, torch.tensor([label]))
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([label])).backward()
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.weight.grad).all()
