"""AT, AT*, F-KD, RKD and HORKD losses against hand formulas, their invariances, gradients and input checks, and
every distillation method of the registry against its weighted public function."""

from __future__ import annotations

import math

import pytest
import torch

from askd.config import Config
from askd.losses import (
    ClassCentres,
    Outputs,
    at_cos_loss,
    at_loss,
    attention_distill_loss,
    attention_map,
    build,
    fkd_loss,
    horkd_loss,
    kd_loss,
    rkd_angle,
    rkd_distance,
    rkd_loss,
)
from askd.losses.horkd import centre_distances, centre_term, horkd_terms
from askd.losses.rkd import pairwise_distances

F64 = torch.float64


def rand(seed, *shape, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def value(x):
    return float(x.detach())


# ---------------------------------------------------------------- hand formulas (plain Python floats)


def smooth_l1(d):
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


def dist(a, b):
    return math.sqrt(max(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)), 1e-12))


def at_map_py(f):
    """(B,C,H,W) tensor -> list of B lists of H*W floats: mean_c f^2, L2-normalised (eps 1e-12)."""
    out = []
    for sample in f.tolist():
        c = len(sample)
        flat = [[v for row in ch for v in row] for ch in sample]
        m = [sum(flat[k][p] ** 2 for k in range(c)) / c for p in range(len(flat[0]))]
        n = max(math.sqrt(sum(v * v for v in m)), 1e-12)
        out.append([v / n for v in m])
    return out


def at_py(teacher, student):
    total = 0.0
    for t, s in zip(teacher, student, strict=True):
        at, as_ = at_map_py(t), at_map_py(s)
        sq = [(x - y) ** 2 for rt, rs in zip(at, as_, strict=True) for x, y in zip(rt, rs, strict=True)]
        total += sum(sq) / len(sq)
    return total


def at_cos_py(teacher, student):
    total = 0.0
    for t, s in zip(teacher, student, strict=True):
        rho = 0.0
        for rt, rs in zip(at_map_py(t), at_map_py(s), strict=True):
            dot = sum(x * y for x, y in zip(rt, rs, strict=True))
            norms = math.sqrt(sum(x * x for x in rt)) * math.sqrt(sum(y * y for y in rs))
            rho += 1.0 - dot / max(norms, 1e-8)
        total += rho / len(t)
    return total


def fkd_py(t, s):
    sq = [(x - y) ** 2 for rt, rs in zip(t.tolist(), s.tolist(), strict=True) for x, y in zip(rt, rs, strict=True)]
    return sum(sq) / len(sq)


def l1_py(t, s):
    ab = [abs(x - y) for rt, rs in zip(t.tolist(), s.tolist(), strict=True) for x, y in zip(rt, rs, strict=True)]
    return sum(ab) / len(ab)


def norm_dist_py(e):
    b = len(e)
    d = [[0.0 if i == j else dist(e[i], e[j]) for j in range(b)] for i in range(b)]
    pos = [v for row in d for v in row if v > 0]
    mean = sum(pos) / len(pos)
    return [v / mean for row in d for v in row]


def rkd_distance_py(t, s):
    dt, ds = norm_dist_py(t.tolist()), norm_dist_py(s.tolist())
    return sum(smooth_l1(a - b) for a, b in zip(ds, dt, strict=True)) / len(dt)


def angles_py(e):
    b = len(e)

    def unit(i, j):
        v = [y - x for x, y in zip(e[i], e[j], strict=True)]
        n = max(math.sqrt(sum(x * x for x in v)), 1e-12)
        return [x / n for x in v]

    return [sum(x * y for x, y in zip(unit(i, j), unit(i, k), strict=True))
            for i in range(b) for j in range(b) for k in range(b)]


def rkd_angle_py(t, s):
    at, as_ = angles_py(t.tolist()), angles_py(s.tolist())
    return sum(smooth_l1(a - b) for a, b in zip(as_, at, strict=True)) / len(at)


def centre_py(t, s, centres):
    """LC over the finite centre rows: smooth_l1 of the mean-normalised (B,C) distance matrices."""
    known = [c for c in centres.tolist() if all(math.isfinite(v) for v in c)]

    def normalised(e):
        d = [dist(row, c) for row in e.tolist() for c in known]
        mean = sum(d) / len(d)
        return [v / mean for v in d]

    dt, ds = normalised(t), normalised(s)
    return sum(smooth_l1(a - b) for a, b in zip(ds, dt, strict=True)) / len(dt)


def horkd_py(t, s, centres, alpha=0.1, beta=0.2, gamma=0.1):
    return (l1_py(t, s) + alpha * rkd_distance_py(t, s) + beta * rkd_angle_py(t, s)
            + gamma * centre_py(t, s, centres))


def cos_rho_py(t, s):
    """mean_b(1 - cos(t_b, s_b)), per-sample flattening, eps 1e-8."""
    b = t.shape[0]
    total = 0.0
    for tv, sv in zip(t.reshape(b, -1).tolist(), s.reshape(b, -1).tolist(), strict=True):
        dot = sum(x * y for x, y in zip(tv, sv, strict=True))
        n = math.sqrt(sum(x * x for x in tv)) * math.sqrt(sum(y * y for y in sv))
        total += 1.0 - dot / max(n, 1e-8)
    return total / b


def stages(seed, channels=(3, 2), sizes=((4, 4), (2, 3)), b=2):
    return [rand(seed + 10 * i, b, c, h, w) for i, (c, (h, w)) in enumerate(zip(channels, sizes, strict=True))]


# ---------------------------------------------------------------- AT and AT*


def test_attention_map_of_a_tiny_feature_map():
    # channel 0 = [[1, 0], [0, 2]], channel 1 = [[1, 2], [0, 0]]: mean_c f^2 = [1, 2, 0, 2], norm 3
    f = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[1.0, 2.0], [0.0, 0.0]]]], dtype=F64)
    got = attention_map(f)
    assert got.shape == (1, 4) and got.dtype == F64
    assert got[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0, 2 / 3], rel=1e-12)
    # sign does not matter (squares), and a zero map stays zero (eps, no NaN)
    torch.testing.assert_close(attention_map(-f), got, rtol=0, atol=0)
    assert attention_map(torch.zeros(1, 2, 2, 2, dtype=F64)).tolist() == [[0.0] * 4]


def test_at_losses_on_tiny_maps_by_hand():
    # teacher map [1, 0, 0, 0]; student channel-mean [1, 1, 1, 1] -> [1/2]*4
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=F64)
    s = torch.ones(1, 3, 2, 2, dtype=F64)
    # mean of (1/2 - 1)^2, 3 x (1/2)^2 = (1/4 + 3/4) / 4
    assert value(at_loss([t], [s])) == pytest.approx(0.25, rel=1e-12)
    # cos = 1/2
    assert value(at_cos_loss([t], [s])) == pytest.approx(0.5, rel=1e-12)


def test_at_losses_match_hand_formula_with_different_widths():
    t, s = stages(0, channels=(3, 5)), stages(1, channels=(2, 4))
    got, got_cos = at_loss(t, s), at_cos_loss(t, s)
    assert got.dim() == 0 and got.dtype == F64 and got_cos.dtype == F64
    assert value(got) == pytest.approx(at_py(t, s), rel=1e-10)
    assert value(got_cos) == pytest.approx(at_cos_py(t, s), rel=1e-10)
    assert value(got) > 0 and value(got_cos) > 0


def test_at_positive_rescale_invariance():
    t, s = stages(0), stages(1)
    for f in t:
        torch.testing.assert_close(attention_map(2.5 * f), attention_map(f), rtol=1e-12, atol=1e-14)
    ref, ref_cos = value(at_loss(t, s)), value(at_cos_loss(t, s))
    for tt, ss in (([2.5 * f for f in t], s), (t, [0.3 * f for f in s])):
        assert value(at_loss(tt, ss)) == pytest.approx(ref, rel=1e-10)
        assert value(at_cos_loss(tt, ss)) == pytest.approx(ref_cos, rel=1e-10)


def test_at_low_precision_gives_fp32():
    t, s = stages(0), stages(1)
    tb, sb = [f.bfloat16() for f in t], [f.bfloat16() for f in s]
    assert at_loss(tb, sb).dtype == torch.float32 and at_cos_loss(tb, sb).dtype == torch.float32
    assert fkd_loss(rand(0, 4, 3).half(), rand(1, 4, 3).half()).dtype == torch.float32


# ---------------------------------------------------------------- F-KD


def test_fkd_matches_hand_formula():
    t, s = rand(0, 4, 6), rand(1, 4, 6)
    got = fkd_loss(t, s)
    assert got.dim() == 0 and got.dtype == F64
    assert value(got) == pytest.approx(fkd_py(t, s), rel=1e-12)
    # by hand: differences 1, -2, 0, 3 -> (1 + 4 + 0 + 9) / 4
    t2 = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=F64)
    s2 = torch.tensor([[1.0, -1.0], [2.0, 6.0]], dtype=F64)
    assert value(fkd_loss(t2, s2)) == pytest.approx(3.5, rel=1e-12)


# ---------------------------------------------------------------- RKD

TRIANGLE = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=F64)  # sides 3, 4, 5; right angle at 0
LINE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=F64)  # sides 1, 1, 2


def test_pairwise_distances_of_a_right_triangle():
    d = pairwise_distances(TRIANGLE)
    want = [[0.0, 3.0, 4.0], [3.0, 0.0, 5.0], [4.0, 5.0, 0.0]]
    assert d.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-12) for row in want]


def test_rkd_terms_on_a_triangle_and_a_line():
    # distances / mean of positives: triangle (3, 4, 5) / 4, line (1, 1, 2) / (4 / 3) = (3/4, 3/4, 3/2);
    # pair differences 0, 1/2, 1/2 -> smooth_l1 0, 1/8, 1/8, each twice in the 3x3 matrix: 1/2 / 9
    assert value(rkd_distance(TRIANGLE, LINE)) == pytest.approx(1 / 18, rel=1e-10)
    # cos at the vertices: triangle 0, 3/5, 4/5; line 1, -1, 1 -> differences 1, -1.6, 0.2 -> smooth_l1 0.5, 1.1,
    # 0.02, each for two ordered (j, k); the 21 triplets with a repeated index agree (0 or 1): 3.24 / 27
    assert value(rkd_angle(TRIANGLE, LINE)) == pytest.approx(0.12, rel=1e-10)
    assert value(rkd_loss(TRIANGLE, LINE)) == pytest.approx(1 / 18 + 2 * 0.12, rel=1e-10)
    assert value(rkd_loss(TRIANGLE, LINE, w_dist=0.5, w_angle=3.0)) == pytest.approx(0.5 / 18 + 0.36, rel=1e-10)


def test_rkd_matches_hand_formula_on_random_embeddings():
    t, s = rand(0, 5, 4), rand(1, 5, 4)
    d, a = rkd_distance(t, s), rkd_angle(t, s)
    assert d.dim() == 0 and d.dtype == F64 and a.dtype == F64
    assert value(d) == pytest.approx(rkd_distance_py(t, s), rel=1e-10)
    assert value(a) == pytest.approx(rkd_angle_py(t, s), rel=1e-10)
    # large embeddings: differences past the smooth-L1 kink
    t3, s3 = 10 * rand(2, 4, 3), rand(3, 4, 3)
    assert value(rkd_distance(t3, s3)) == pytest.approx(rkd_distance_py(t3, s3), rel=1e-10)
    assert value(rkd_angle(t3, s3)) == pytest.approx(rkd_angle_py(t3, s3), rel=1e-10)


def test_rkd_invariances():
    t, s = rand(0, 5, 4), rand(1, 5, 4)
    ref_d, ref_a = value(rkd_distance(t, s)), value(rkd_angle(t, s))
    assert ref_d > 0 and ref_a > 0
    assert value(rkd_distance(3.7 * t, s)) == pytest.approx(ref_d, rel=1e-9)
    assert value(rkd_distance(t, 0.2 * s)) == pytest.approx(ref_d, rel=1e-9)
    shift = torch.tensor([5.0, -2.0, 0.5, 3.0], dtype=F64)
    assert value(rkd_angle(t + shift, s)) == pytest.approx(ref_a, rel=1e-9)
    assert value(rkd_angle(t, s - 2 * shift)) == pytest.approx(ref_a, rel=1e-9)


# ---------------------------------------------------------------- HORKD


def test_centre_distances_by_hand():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=F64)
    c = torch.tensor([[0.0, 0.0], [0.0, 4.0], [6.0, 8.0]], dtype=F64)
    got = centre_distances(e, c)
    assert got.tolist() == [pytest.approx([1e-6, 4.0, 10.0], rel=1e-9), pytest.approx([5.0, 3.0, 5.0], rel=1e-12)]


def test_horkd_matches_hand_formula():
    t, s, centres = rand(0, 5, 4), rand(1, 5, 4), rand(2, 3, 4)
    labels = torch.tensor([0, 1, 2, 1, 0])
    got = horkd_loss(t, s, labels, centres)
    assert got.dim() == 0 and got.dtype == F64
    assert value(got) == pytest.approx(horkd_py(t, s, centres), rel=1e-10)
    assert value(horkd_loss(t, s, labels, centres, 0.3, 0.5, 2.0)) == pytest.approx(
        horkd_py(t, s, centres, 0.3, 0.5, 2.0), rel=1e-10)
    terms = [value(x) for x in horkd_terms(t, s, labels, centres)]
    want = [l1_py(t, s), rkd_distance_py(t, s), rkd_angle_py(t, s), centre_py(t, s, centres)]
    assert terms == pytest.approx(want, rel=1e-10)
    assert value(centre_term(t, s, centres)) == pytest.approx(centre_py(t, s, centres), rel=1e-10)


def test_horkd_centre_term_skips_unseen_classes():
    t, s = rand(0, 4, 3), rand(1, 4, 3)
    centres = rand(2, 5, 3)
    centres[1] = float("nan")
    centres[3] = float("nan")
    finite = centres[[0, 2, 4]]
    assert value(centre_term(t, s, centres)) == pytest.approx(value(centre_term(t, s, finite)), rel=1e-12)
    assert value(centre_term(t, s, centres)) == pytest.approx(centre_py(t, s, finite), rel=1e-10)
    labels = torch.tensor([0, 2, 4, 2])  # classes 0, 2, 4 are rows 0, 1, 2 of ``finite``
    got = horkd_loss(t, s, labels, centres)
    assert math.isfinite(value(got))
    assert value(got) == pytest.approx(value(horkd_loss(t, s, torch.tensor([0, 1, 2, 1]), finite)), rel=1e-12)


def test_horkd_centre_term_zero_when_student_is_teacher():
    t = rand(0, 4, 3)
    for seed in range(3):
        centres = 5 * rand(10 + seed, 6, 3)
        assert value(centre_term(t, t.clone(), centres)) == 0.0


# ---------------------------------------------------------------- shared properties


def embedding_losses(labels=None, centres=None):
    """name -> f(teacher, student) on embeddings (B,E)."""
    fns = {"fkd": fkd_loss, "rkd_distance": rkd_distance, "rkd_angle": rkd_angle, "rkd": rkd_loss}
    if labels is not None:
        fns["horkd"] = lambda t, s: horkd_loss(t, s, labels, centres)
        fns["horkd_centre"] = lambda t, s: centre_term(t, s, centres)
    return fns


def test_identical_inputs_give_zero():
    t_st = stages(0)
    assert value(at_loss(t_st, [f.clone() for f in t_st])) == pytest.approx(0.0, abs=1e-14)
    assert value(at_cos_loss(t_st, [f.clone() for f in t_st])) == pytest.approx(0.0, abs=1e-14)
    t = rand(1, 5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    for name, fn in embedding_losses(labels, rand(2, 3, 4)).items():
        assert value(fn(t, t.clone())) == pytest.approx(0.0, abs=1e-14), name
    terms = horkd_terms(t, t.clone(), labels, rand(3, 3, 4))
    assert [value(x) for x in terms] == pytest.approx([0.0] * 4, abs=1e-14)


def test_gradcheck_fp64_student():
    t_st, s_st = stages(0, channels=(3, 2), sizes=((3, 3), (2, 2)), b=4), stages(1, channels=(2, 4),
                                                                               sizes=((3, 3), (2, 2)), b=4)
    s_in = tuple(f.clone().requires_grad_() for f in s_st)
    for fn in (at_loss, at_cos_loss):
        assert torch.autograd.gradcheck(lambda *xs, fn=fn: fn(t_st, list(xs)), s_in, eps=1e-6, atol=1e-6), fn
    t = rand(2, 5, 4)
    s = rand(3, 5, 4).requires_grad_()
    labels = torch.tensor([0, 1, 2, 1, 0])
    centres = rand(4, 3, 4)
    for name, fn in embedding_losses(labels, centres).items():
        assert torch.autograd.gradcheck(lambda x, fn=fn: fn(t, x), (s,), eps=1e-6, atol=1e-6), name


def test_teacher_gets_no_gradient():
    t_st = [f.requires_grad_() for f in stages(0)]
    for fn in (at_loss, at_cos_loss):
        s_st = [f.requires_grad_() for f in stages(1)]
        fn(t_st, s_st).backward()
        assert all(f.grad is None for f in t_st), fn
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_st), fn
    labels = torch.tensor([0, 1, 2, 0, 1])
    centres = rand(2, 3, 4).requires_grad_()
    for name, fn in embedding_losses(labels, centres).items():
        t, s = rand(3, 5, 4).requires_grad_(), rand(4, 5, 4).requires_grad_()
        fn(t, s).backward()
        assert t.grad is None, name
        assert s.grad is not None and s.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- input checks


def test_embedding_losses_refuse_bad_inputs():
    good = rand(0, 4, 3)
    labels, centres = torch.tensor([0, 1, 0, 1]), rand(1, 2, 3)
    for name, fn in embedding_losses(labels, centres).items():
        if name == "horkd_centre":
            continue
        fn_name = {"fkd": "fkd_loss", "rkd": "rkd_distance", "horkd": "horkd_loss"}.get(name, name)
        with pytest.raises(ValueError, match=rf"{fn_name}: teacher \(4, 3\) != student \(4, 5\)"):
            fn(good, rand(2, 4, 5))
        with pytest.raises(ValueError, match=rf"{fn_name}: expected a floating-point 2-d student tensor"):
            fn(good, torch.zeros(4, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match=rf"{fn_name}: expected a floating-point 2-d teacher tensor"):
            fn(torch.zeros(4, 3, dtype=torch.int32), good)
        with pytest.raises(ValueError, match="expected a floating-point 2-d student tensor, got \\(4, 3, 1\\)"):
            fn(good, good[..., None])
        with pytest.raises(ValueError, match=rf"{fn_name}: teacher on meta, student on cpu"):
            fn(torch.zeros(4, 3, dtype=F64, device="meta"), good)
    for fn in (rkd_distance, rkd_angle, rkd_loss):
        with pytest.raises(ValueError, match="needs a batch of at least 2 samples, got 1"):
            fn(good[:1], good[:1])
    with pytest.raises(ValueError, match="horkd_loss: needs a batch of at least 2 samples, got 1"):
        horkd_loss(good[:1], good[:1], labels[:1], centres)
    fkd_loss(good[:1], good[:1])  # F-KD has no batch minimum


def test_horkd_refuses_bad_labels_and_centres():
    t, s = rand(0, 4, 3), rand(1, 4, 3)
    centres = rand(2, 3, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0..3"):
        horkd_loss(t, s, torch.tensor([0, 1, 3, 2]), centres)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got -1..2"):
        horkd_loss(t, s, torch.tensor([0, -1, 2, 2]), centres)
    holed = centres.clone()
    holed[1] = float("nan")
    with pytest.raises(ValueError, match="own class has no centre yet"):
        horkd_loss(t, s, torch.tensor([0, 1, 2, 2]), holed)
    with pytest.raises(ValueError, match=r"labels must be int \(B=4,\), got \(4,\) torch.float32"):
        horkd_loss(t, s, torch.tensor([0.0, 1.0, 2.0, 2.0]), centres)
    with pytest.raises(ValueError, match=r"labels must be int \(B=4,\), got \(3,\)"):
        horkd_loss(t, s, torch.tensor([0, 1, 2]), centres)
    with pytest.raises(ValueError, match=r"centres must be floating \(C,E=3\), got \(3, 4\)"):
        horkd_loss(t, s, torch.tensor([0, 1, 2, 2]), rand(3, 3, 4))
    with pytest.raises(ValueError, match="centres must be floating"):
        horkd_loss(t, s, torch.tensor([0, 1, 2, 2]), torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels on meta"):
        horkd_loss(t, s, torch.tensor([0, 1, 2, 2], device="meta"), centres)


def test_at_losses_refuse_bad_inputs():
    t, s = stages(0), stages(1)
    for fn in (at_loss, at_cos_loss):
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"{name}: .*same non-zero number of stage outputs, got 2 and 1"):
            fn(t, s[:1])
        with pytest.raises(ValueError, match="got 0 and 0"):
            fn([], [])
        with pytest.raises(ValueError, match=rf"{name} stage 1: teacher \(2, 2, 2, 3\) != student \(2, 2, 3, 2\)"):
            fn(t, [s[0], rand(5, 2, 2, 3, 2)])
        with pytest.raises(ValueError, match=rf"{name} stage 0: teacher \(2, 3, 4, 4\) != student \(3, 3, 4, 4\)"):
            fn(t, [rand(5, 3, 3, 4, 4), s[1]])
        with pytest.raises(ValueError, match=rf"{name} stage 0: expected a floating-point 4-d student tensor"):
            fn(t, [s[0].flatten(2), s[1]])
        with pytest.raises(ValueError, match=rf"{name} stage 1: expected a floating-point 4-d teacher tensor"):
            fn([t[0], t[1].long()], s)
        with pytest.raises(ValueError, match=rf"{name} stage 0: teacher on meta, student on cpu"):
            fn([torch.zeros(2, 3, 4, 4, device="meta"), t[1]], s)


# ---------------------------------------------------------------- ClassCentres


def test_class_centres_running_means_and_state_dict():
    c = ClassCentres(4, 3)
    assert c.sums.dtype == torch.float32 and c.counts.dtype == torch.float32
    assert torch.isnan(c.means()).all()
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.0, 1.0]], dtype=F64)
    b = torch.tensor([[7.0, 8.0, 9.0], [0.5, 0.5, 0.5]])
    c.update(a, torch.tensor([0, 2, 0]))
    c.update(b.requires_grad_(), torch.tensor([0, 2]))
    means = c.means()
    assert means.shape == (4, 3) and not means.requires_grad
    # class 0: (1,2,3), (-1,0,1), (7,8,9); class 2: (4,5,6), (0.5,0.5,0.5); classes 1, 3 unseen
    assert means[0].tolist() == pytest.approx([7 / 3, 10 / 3, 13 / 3], rel=1e-6)
    assert means[2].tolist() == pytest.approx([2.25, 2.75, 3.25], rel=1e-6)
    assert torch.isnan(means[1]).all() and torch.isnan(means[3]).all()
    assert c.counts.tolist() == [3.0, 0.0, 2.0, 0.0]
    fresh = ClassCentres(4, 3)
    fresh.load_state_dict(c.state_dict())
    torch.testing.assert_close(fresh.means(), means, equal_nan=True)


# ---------------------------------------------------------------- the methods through the registry

B, E, N = 4, 5, 6  # batch, embedding size, classes


def outputs(seed=0, labels=(0, 2, 2, 5)):
    g = iter(range(seed * 100, seed * 100 + 100))
    maps = lambda: [(rand(next(g), B, c), rand(next(g), B, 1, h, w)) for c, (h, w) in ((4, (3, 3)), (6, (2, 2)))]  # noqa: E731
    feats = lambda c: [rand(next(g), B, ci, 3, 3) for ci in c]  # noqa: E731
    return Outputs(
        torch.tensor(labels), rand(next(g), B, E), maps(), 8 * rand(next(g), B, N),
        teacher_emb=rand(next(g), B, E), teacher_maps=maps(), student_stages=feats((2, 3)),
        teacher_stages=feats((4, 5)), teacher_logits=8 * rand(next(g), B, N),
    )


def close(got, want, rel=1e-10):
    assert value(got) == pytest.approx(value(want), rel=rel)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.delenv("ASKD_BACKEND", raising=False)


@pytest.mark.parametrize(("name", "key", "factor", "fn"), [
    ("at", "at_beta", 0.5, lambda o: at_loss(o.teacher_stages, o.student_stages)),
    ("at_cos", "at_cos_weight", 1.0, lambda o: at_cos_loss(o.teacher_stages, o.student_stages)),
    ("fkd", "fkd_weight", 1.0, lambda o: fkd_loss(o.teacher_emb, o.student_emb)),
    ("kd", "kd_weight", 1.0, lambda o: kd_loss(o.teacher_logits, o.student_logits, 4.0)),
    ("askd", "distill_weight", 1.0, lambda o: attention_distill_loss(o.teacher_maps, o.student_maps, weight=1.0)),
    ("askd_sa", "distill_weight", 1.0,
     lambda o: attention_distill_loss(o.teacher_maps, o.student_maps, weight=1.0, kinds=("spatial",))),
    ("askd_ca", "distill_weight", 1.0,
     lambda o: attention_distill_loss(o.teacher_maps, o.student_maps, weight=1.0, kinds=("channel",))),
])
@pytest.mark.parametrize("w", [1.0, 7.5])
def test_weighted_methods(name, key, factor, fn, w):
    out = outputs()
    terms = build(name, Config(**{key: w}), N)(out)
    assert set(terms) == {name}
    rel = 1e-6 if name == "kd" else 1e-10  # kd is computed in fp32
    close(terms[name], factor * w * fn(out), rel=rel)
    assert value(terms[name]) > 0


def test_defaults_of_the_weights():
    out = outputs()
    cfg = Config()
    close(build("at", cfg, N)(out)["at"], 500.0 * at_loss(out.teacher_stages, out.student_stages))
    close(build("at_cos", cfg, N)(out)["at_cos"], 5.0 * at_cos_loss(out.teacher_stages, out.student_stages))
    close(build("fkd", cfg, N)(out)["fkd"], 0.1 * fkd_loss(out.teacher_emb, out.student_emb))
    r = build("rkd", cfg, N)(out)
    close(r["rkd_distance"] + r["rkd_angle"], rkd_loss(out.teacher_emb, out.student_emb))


def test_askd_variants_by_hand():
    out = outputs(1)
    rho = [(cos_rho_py(tc, sc), cos_rho_py(ts, ss))
           for (tc, ts), (sc, ss) in zip(out.teacher_maps, out.student_maps, strict=True)]
    w = 3.0
    for variant, full in (("official", w * sum(c + s for c, s in rho)), ("paper", w * sum(c + s for c, s in rho) / 2)):
        cfg = Config(distill_weight=w, variant=variant)
        assert value(build("askd", cfg, N)(out)["askd"]) == pytest.approx(full, rel=1e-10)
        # one kind: weight * sum of its rho in both variants (the paper variant has nothing to average)
        assert value(build("askd_sa", cfg, N)(out)["askd_sa"]) == pytest.approx(w * sum(s for _, s in rho), rel=1e-10)
        assert value(build("askd_ca", cfg, N)(out)["askd_ca"]) == pytest.approx(w * sum(c for c, _ in rho), rel=1e-10)


def test_rkd_method_weights_its_two_terms():
    out = outputs()
    terms = build("rkd", Config(rkd_distance_weight=0.7, rkd_angle_weight=3.0), N)(out)
    assert set(terms) == {"rkd_distance", "rkd_angle"}
    close(terms["rkd_distance"], 0.7 * rkd_distance(out.teacher_emb, out.student_emb))
    close(terms["rkd_angle"], 3.0 * rkd_angle(out.teacher_emb, out.student_emb))
    assert value(terms["rkd_distance"]) == pytest.approx(0.7 * rkd_distance_py(out.teacher_emb, out.student_emb),
                                                         rel=1e-10)


def test_horkd_method_updates_centres_then_weights_its_terms():
    cfg = Config(embedding_size=E, horkd_alpha=0.3, horkd_beta=0.6, horkd_gamma=1.5)
    method = build("horkd", cfg, N)
    first, second = outputs(0, labels=(0, 2, 2, 5)), outputs(1, labels=(2, 3, 3, 0))
    weights = {"horkd_l1": 1.0, "horkd_distance": 0.3, "horkd_angle": 0.6, "horkd_centre": 1.5}
    seen: dict[int, list[list[float]]] = {}
    for out in (first, second):
        terms = method(out)
        assert set(terms) == set(weights)
        for label, row in zip(out.labels.tolist(), out.teacher_emb.tolist(), strict=True):
            seen.setdefault(label, []).append(row)
        centres = torch.full((N, E), float("nan"), dtype=F64)
        for label, rows in seen.items():
            centres[label] = torch.tensor([sum(col) / len(rows) for col in zip(*rows, strict=True)], dtype=F64)
        torch.testing.assert_close(method.centres.means().double(), centres, rtol=1e-6, atol=1e-6, equal_nan=True)
        t, s = out.teacher_emb, out.student_emb
        want = {"horkd_l1": l1_py(t, s), "horkd_distance": rkd_distance_py(t, s), "horkd_angle": rkd_angle_py(t, s),
                "horkd_centre": centre_py(t, s, centres)}
        for name, w in weights.items():
            # the centres are float32 sums: rel 1e-5 for the centre term
            assert value(terms[name]) == pytest.approx(w * want[name], rel=1e-5 if name == "horkd_centre" else 1e-10)
        total = sum(terms.values())
        close(total, horkd_loss(t, s, out.labels, method.centres.means(), 0.3, 0.6, 1.5))
    assert method.centres.counts.tolist() == [2.0, 0.0, 3.0, 2.0, 0.0, 1.0]
    assert "centres.sums" in method.state_dict()


def test_composite_askd_plus_kd_is_the_union():
    out = outputs(2)
    cfg = Config(distill_weight=2.0, kd_weight=0.5, kd_temperature=2.0)
    terms = build("askd+kd", cfg, N)(out)
    assert set(terms) == {"askd", "kd"}
    assert set(build("askd_kd", cfg, N)(out)) == {"askd", "kd"}
    close(terms["askd"], build("askd", cfg, N)(out)["askd"])
    close(terms["kd"], 0.5 * kd_loss(out.teacher_logits, out.student_logits, 2.0), rel=1e-6)


def test_methods_pass_gradient_to_the_student_only():
    out = outputs(3)
    for f in (out.student_emb, *out.student_stages, *[m for pair in out.student_maps for m in pair]):
        f.requires_grad_()
    for f in (out.teacher_emb, *out.teacher_stages, *[m for pair in out.teacher_maps for m in pair]):
        f.requires_grad_()
    cfg = Config(embedding_size=E)
    for name in ("at", "at_cos", "fkd", "rkd", "horkd", "askd", "askd_sa", "askd_ca"):
        sum(build(name, cfg, N)(out).values()).backward()
    assert out.teacher_emb.grad is None
    assert all(f.grad is None for f in out.teacher_stages)
    assert all(m.grad is None for pair in out.teacher_maps for m in pair)
    assert out.student_emb.grad is not None and all(f.grad is not None for f in out.student_stages)
