"""A-SKD attention cosine loss and the Hinton KD loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from askd.losses import attention_distill_loss, kd_loss

SHAPES = [((2, 8), (2, 1, 4, 4)), ((2, 16), (2, 1, 2, 3)), ((2, 5), (2, 1, 1, 1))]


def random_maps(seed, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, generator=g, dtype=dtype), torch.randn(s, generator=g, dtype=dtype)) for c, s in shapes]


def apply(maps, fn):
    return [(fn(c), fn(s)) for c, s in maps]


def rho_by_hand(t, s):
    """mean_b(1 - cos_b) with per-sample flattening, plain Python floats, eps 1e-8 on the norm product."""
    b = t.shape[0]
    tf = t.reshape(b, -1).tolist()
    sf = s.reshape(b, -1).tolist()
    total = 0.0
    for tv, sv in zip(tf, sf, strict=True):
        dot = sum(x * y for x, y in zip(tv, sv, strict=True))
        nt = math.sqrt(sum(x * x for x in tv))
        ns = math.sqrt(sum(y * y for y in sv))
        total += 1.0 - dot / max(nt * ns, 1e-8)
    return total / b


def loss_by_hand(teacher, student, variant, weight):
    rhos = [(rho_by_hand(tc, sc), rho_by_hand(ts, ss)) for (tc, ts), (sc, ss) in zip(teacher, student, strict=True)]
    if variant == "official":
        return weight * sum(rc + rs for rc, rs in rhos)
    return weight * sum((rc + rs) / 2 for rc, rs in rhos)


def value(x):
    return float(x.detach())


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("weight", [5.0, 0.7])
def test_random_maps_match_hand_formula(variant, weight):
    t = random_maps(0)
    s = random_maps(1)
    got = attention_distill_loss(t, s, variant, weight)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert value(got) == pytest.approx(loss_by_hand(t, s, variant, weight), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_identical_is_zero(variant):
    t = random_maps(0)
    assert value(attention_distill_loss(t, apply(t, torch.clone), variant, 5.0)) == pytest.approx(0.0, abs=1e-5)


def test_opposite_maps():
    t = random_maps(0)
    s = apply(t, lambda x: -x)
    n = len(t)
    # 1 - cos = 2 for every map: official sums 2N maps, paper averages the pair per block
    assert value(attention_distill_loss(t, s, "official", 5.0)) == pytest.approx(5.0 * 2 * 2 * n, rel=1e-5)
    assert value(attention_distill_loss(t, s, "paper", 5.0)) == pytest.approx(5.0 * 2 * n, rel=1e-5)


def orthogonal_pair(b, d):
    t = torch.zeros(b, d)
    s = torch.zeros(b, d)
    t[:, 0] = torch.arange(1, b + 1).float()
    s[:, 1] = 3.0
    return t, s


def test_orthogonal_maps():
    tc, sc = orthogonal_pair(2, 6)
    ts, ss = orthogonal_pair(2, 9)
    t = [(tc, ts.view(2, 1, 3, 3))] * 3
    s = [(sc, ss.view(2, 1, 3, 3))] * 3
    assert value(attention_distill_loss(t, s, "official", 2.0)) == pytest.approx(2.0 * 6, rel=1e-6)
    assert value(attention_distill_loss(t, s, "paper", 2.0)) == pytest.approx(2.0 * 3, rel=1e-6)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_positive_rescale_is_zero(variant):
    t = random_maps(0)
    s = apply(t, lambda x: 3 * x)
    assert value(attention_distill_loss(t, s, variant, 5.0)) == pytest.approx(0.0, abs=1e-5)


def test_shift_is_not_invariant():
    """s = t + c for t = [1, 0], c = 1: cos = (1*2 + 0*1) / (1 * sqrt(5)) = 2/sqrt(5)."""
    t = torch.tensor([[1.0, 0.0]])
    sp_t = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    s = t + 1.0
    sp_s = sp_t - 2.0  # [1, 2]: cos = (3 + 8) / (5 * sqrt(5)) = 11 / (5 sqrt 5)
    rho_c = 1 - 2 / math.sqrt(5)
    rho_s = 1 - 11 / (5 * math.sqrt(5))
    got_o = value(attention_distill_loss([(t, sp_t)], [(s, sp_s)], "official", 5.0))
    got_p = value(attention_distill_loss([(t, sp_t)], [(s, sp_s)], "paper", 5.0))
    assert got_o == pytest.approx(5.0 * (rho_c + rho_s), rel=1e-6)
    assert got_p == pytest.approx(5.0 * (rho_c + rho_s) / 2, rel=1e-6)
    assert got_o > 0.5


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_zero_vectors_use_eps_convention(variant):
    t = [(torch.zeros(2, 4), torch.ones(2, 1, 2, 2)), (torch.ones(2, 3), torch.zeros(2, 1, 1, 2))]
    sc0 = torch.ones(2, 4, requires_grad=True)
    ss0 = torch.zeros(2, 1, 2, 2, requires_grad=True)
    sc1 = torch.zeros(2, 3, requires_grad=True)
    ss1 = torch.zeros(2, 1, 1, 2, requires_grad=True)
    loss = attention_distill_loss(t, [(sc0, ss0), (sc1, ss1)], variant, 5.0)
    # every map has a zero vector on one side: cos = 0, so 1 - cos = 1 per map
    want = 5.0 * 4 if variant == "official" else 5.0 * 2
    assert not torch.isnan(loss)
    assert value(loss) == pytest.approx(want, rel=1e-6)
    loss.backward()
    for g in (sc0.grad, ss0.grad, sc1.grad, ss1.grad):
        assert g is not None and not torch.isnan(g).any()


def test_per_sample_cosine_and_batch_mean():
    """Sample 0 identical (1 - cos = 0), sample 1 opposite with a different norm (1 - cos = 2): mean 1.

    Flattening the whole batch into one vector would give a different value.
    """
    t = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    sp = torch.ones(2, 1, 1, 1)
    got = value(attention_distill_loss([(t, sp)], [(s, sp.clone())], "official", 1.0))
    assert got == pytest.approx(1.0, rel=1e-6)
    flat_cos = (t * s).sum() / (t.norm() * s.norm())
    assert abs(float(1 - flat_cos) - 1.0) > 0.1


def test_batch_size_one():
    t = [(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2))]
    s = [(torch.tensor([[2.0, 1.0]]), torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2))]
    # channel: cos = 4/5; spatial: orthogonal
    assert value(attention_distill_loss(t, s, "official", 1.0)) == pytest.approx(0.2 + 1.0, rel=1e-6)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_teacher_gets_no_gradient_student_does(variant):
    t = apply(random_maps(0), lambda x: x.requires_grad_())
    s = apply(random_maps(1), lambda x: x.requires_grad_())
    attention_distill_loss(t, s, variant, 5.0).backward()
    for tc, ts in t:
        assert tc.grad is None and ts.grad is None
    for sc, ss in s:
        assert sc.grad is not None and ss.grad is not None
        assert sc.grad.abs().sum() > 0
        # a one-element map has cos = sign(t * s), flat in s: zero gradient there
        assert ss.grad.abs().sum() > 0 or ss[0].numel() == 1


def test_student_gradient_matches_hand_derivative():
    """d/ds (1 - cos(t, s)) = -(t / (|t||s|) - cos * s / |s|^2), averaged over the batch, times weight."""
    t = random_maps(0, dtype=torch.float64)
    s = apply(random_maps(1, dtype=torch.float64), lambda x: x.requires_grad_())
    weight = 3.0
    attention_distill_loss(t, s, "official", weight).backward()
    for (tc, ts), (sc, ss) in zip(t, s, strict=True):
        for tm, sm in ((tc, sc), (ts, ss)):
            b = tm.shape[0]
            tf, sf = tm.reshape(b, -1), sm.detach().reshape(b, -1)
            nt, ns = tf.norm(dim=1, keepdim=True), sf.norm(dim=1, keepdim=True)
            cos = (tf * sf).sum(dim=1, keepdim=True) / (nt * ns)
            grad = -(tf / (nt * ns) - cos * sf / ns**2) / b * weight
            torch.testing.assert_close(sm.grad.reshape(b, -1), grad)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gradcheck_fp64(variant):
    t = random_maps(0, shapes=SHAPES[:2], dtype=torch.float64)
    s = random_maps(1, shapes=SHAPES[:2], dtype=torch.float64)
    flat = [x.clone().requires_grad_() for pair in s for x in pair]

    def fn(*xs):
        pairs = [(xs[i], xs[i + 1]) for i in range(0, len(xs), 2)]
        return attention_distill_loss(t, pairs, variant, 5.0)

    assert fn(*flat).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, tuple(flat), eps=1e-6, atol=1e-6)


def test_low_precision_maps_give_fp32():
    t = apply(random_maps(0), lambda x: x.bfloat16())
    s = apply(random_maps(1), lambda x: x.bfloat16())
    got = attention_distill_loss(t, s, "official", 5.0)
    assert got.dtype == torch.float32
    want = loss_by_hand(apply(t, lambda x: x.float()), apply(s, lambda x: x.float()), "official", 5.0)
    assert value(got) == pytest.approx(want, rel=1e-5)


def test_mismatches_raise():
    t = random_maps(0)
    s = random_maps(1)
    with pytest.raises(ValueError):
        attention_distill_loss(t, s[:2], "official")
    with pytest.raises(ValueError):
        attention_distill_loss([], [], "official")
    bad = list(s)
    bad[1] = (torch.randn(2, 15), bad[1][1])
    with pytest.raises(ValueError):
        attention_distill_loss(t, bad, "official")
    bad = list(s)
    bad[0] = (bad[0][0], torch.randn(2, 1, 4, 5))
    with pytest.raises(ValueError):
        attention_distill_loss(t, bad, "paper")
    bad = list(s)
    bad[0] = (bad[0][0], torch.randn(3, 1, 4, 4))
    with pytest.raises(ValueError):
        attention_distill_loss(t, bad, "paper")
    with pytest.raises(ValueError):
        attention_distill_loss(t, s, "nope")


# ---------------------------------------------------------------- kd_loss


def kd_by_hand(t, s, temperature):
    total = 0.0
    for tr, sr in zip(t.tolist(), s.tolist(), strict=True):
        tz = [v / temperature for v in tr]
        sz = [v / temperature for v in sr]
        tl = math.log(sum(math.exp(v) for v in tz))
        sl = math.log(sum(math.exp(v) for v in sz))
        for a, b in zip(tz, sz, strict=True):
            log_pt, log_ps = a - tl, b - sl
            total += math.exp(log_pt) * (log_pt - log_ps)
    return temperature**2 * total / t.shape[0]


def test_kd_matches_hand_formula_default_t4():
    torch.manual_seed(0)
    t = torch.randn(4, 7) * 8
    s = torch.randn(4, 7) * 8
    assert float(kd_loss(t, s)) == pytest.approx(kd_by_hand(t, s, 4.0), rel=1e-5)
    assert float(kd_loss(t, s, temperature=2.0)) == pytest.approx(kd_by_hand(t, s, 2.0), rel=1e-5)
    assert float(kd_loss(t, s)) > 0


def test_kd_zero_when_equal_and_shift_invariant():
    torch.manual_seed(1)
    t = torch.randn(3, 5) * 10
    assert float(kd_loss(t, t.clone())) == pytest.approx(0.0, abs=1e-6)
    # softmax ignores a per-row constant
    assert float(kd_loss(t, t + torch.tensor([[1.0], [-3.0], [7.0]]))) == pytest.approx(0.0, abs=1e-5)


def test_kd_teacher_detached_and_student_gradient():
    torch.manual_seed(2)
    temperature = 4.0
    t = (torch.randn(3, 6) * 5).requires_grad_()
    s = (torch.randn(3, 6) * 5).requires_grad_()
    kd_loss(t, s, temperature).backward()
    assert t.grad is None
    # d/ds [T^2 / B * sum KL(p_t || p_s)] = T / B * (p_s - p_t)
    p_t = torch.softmax(t.detach().double() / temperature, dim=1)
    p_s = torch.softmax(s.detach().double() / temperature, dim=1)
    torch.testing.assert_close(s.grad.double(), temperature / 3 * (p_s - p_t), rtol=1e-4, atol=1e-6)


def test_kd_shape_mismatch_raises():
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(2, 5), torch.zeros(2, 6))
