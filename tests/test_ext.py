"""The compiled extension's CPU kernels (backend "ext") against the written-out references in askd.ops.

Forward outputs (y, both maps and what backward keeps), every gradient, fp64 gradcheck, opcheck, the
layouts, dtypes, odd shapes, B=1, non-contiguous input, ties, and the error messages for bad input.
"""

from __future__ import annotations

import pytest
import torch

from askd import backend
from askd.losses import attention_distill_loss
from askd.nn import CBAM
from askd.ops.cbam import cbam, cbam_backward_ref, cbam_forward_ref, cbam_ref, fused_cbam, memory_format
from askd.ops.cosine_distill import (
    cosine_distill,
    cosine_distill_backward_ref,
    cosine_distill_forward_ref,
    cosine_distill_ref,
    fused_cosine_distill,
)

REASON = backend.availability("cpu")["ext"]
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"ext backend unavailable on cpu: {REASON}")

# (rtol, atol) per input dtype, for outputs in that dtype (y, dx) and for the fp32/fp64 maps and weight grads.
# Low precision: the kernels and the reference accumulate in fp32 from the same input, so outputs differ by
# the final rounding (a few ulp of bf16/fp16) and maps by summation order only.
TOL = {
    torch.float64: {"out": (1e-10, 1e-12), "acc": (1e-10, 1e-12)},
    torch.float32: {"out": (1e-5, 1e-6), "acc": (1e-4, 1e-5)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "acc": (1e-4, 1e-4)},
    torch.float16: {"out": (4e-3, 4e-3), "acc": (1e-4, 1e-4)},
}
FORWARD_NAMES = ("y", "a_c", "a_s", "chan", "idx_c", "pooled", "idx_s")
GRAD_NAMES = ("dx", "dw1", "dw2", "dws")
# (B, C, H, W, R, k): B=1, primes, a 1x1 map, the four IR-50 stage shapes at B=2, both spatial kernels
SHAPES = [
    (1, 13, 7, 5, 1, 3),
    (2, 12, 5, 7, 3, 7),
    (3, 1, 4, 4, 1, 3),
    (2, 8, 1, 1, 2, 3),
    (2, 64, 56, 56, 4, 3),
    (2, 128, 28, 28, 8, 7),
    (2, 256, 14, 14, 16, 3),
    (2, 512, 7, 7, 32, 7),
]


def inputs(shape, dtype=torch.float32, layout=torch.contiguous_format, seed=0):
    B, C, H, W, R, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(dtype).contiguous(memory_format=layout)
    w1, w2, ws = (torch.randn(*s, generator=g) / s[-1] ** 0.5 for s in ((R, C), (C, R), (2, k, k)))
    return x, w1, w2, ws


def grads_in(x, a_c, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = x.shape
    dy = torch.randn(x.shape, generator=g).to(x.dtype).contiguous(memory_format=memory_format(x))
    return dy, torch.randn(B, C, generator=g).to(a_c.dtype), torch.randn(B, 1, H, W, generator=g).to(a_c.dtype)


def assert_close(name, got, want, dtype):
    if not got.is_floating_point():
        assert torch.equal(got, want), f"{name}: indices differ"
        return
    rtol, atol = TOL[dtype]["out" if got.dtype == dtype else "acc"]
    # gradients grow with the map size: compare relative to their range (floored: a 1-element map's cosine
    # gradient is zero up to rounding noise)
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cbam_forward_and_backward_match_contract(shape, layout):
    x, w1, w2, ws = inputs(shape, layout=layout)
    want = cbam_forward_ref(x, w1, w2, ws)
    got = torch.ops.askd.cbam_forward(x, w1, w2, ws)
    for name, g, w in zip(FORWARD_NAMES, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(name, g, w, x.dtype)
    assert got[0].is_contiguous(memory_format=layout)
    grads = grads_in(x, want[1])
    want = cbam_backward_ref(*grads, x, w1, w2, ws, *want[1:])
    got = torch.ops.askd.cbam_backward(*grads, x, w1, w2, ws, *got[1:])
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(name, g, w, x.dtype)
    assert got[0].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cbam_dtypes(dtype, layout):
    x, w1, w2, ws = inputs((2, 24, 9, 11, 3, 3), dtype, layout)
    want, got = cbam_forward_ref(x, w1, w2, ws), torch.ops.askd.cbam_forward(x, w1, w2, ws)
    for name, g, w in zip(FORWARD_NAMES, got, want, strict=True):
        if name == "y":
            assert g.dtype == dtype
        if name.startswith("idx") and dtype != torch.float64:
            continue  # low precision: a near-tie may resolve differently after fp32 summation order
        assert_close(name, g, w, dtype)
    grads = grads_in(x, want[1])
    for name, g, w in zip(
        GRAD_NAMES,
        torch.ops.askd.cbam_backward(*grads, x, w1, w2, ws, *want[1:]),
        cbam_backward_ref(*grads, x, w1, w2, ws, *want[1:]),
        strict=True,
    ):
        assert_close(name, g, w, dtype)


def test_cbam_ties_take_the_first_index():
    x, w1, w2, ws = inputs((2, 6, 4, 5, 2, 3))
    x = x.round()  # many equal values per row and per pixel
    x[0] = 1.0  # a sample that is all ties
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        want, got = cbam_forward_ref(xl, w1, w2, ws), torch.ops.askd.cbam_forward(xl, w1, w2, ws)
        assert torch.equal(got[4], want[4]) and torch.equal(got[6], want[6])
        assert (got[4][0] == 0).all()  # a constant sample: every channel's maximum is at pixel 0


@pytest.mark.parametrize("k,maps", [(3, "logits"), (7, "sigmoid")], ids=["official", "paper"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_ext_matches_module_torch(k, maps, layout):
    torch.manual_seed(0)
    ref = CBAM(32, reduction=4, spatial_kernel=k, maps=maps)
    ext = CBAM(32, reduction=4, spatial_kernel=k, maps=maps, backend="ext")
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(3, 32, 10, 9).contiguous(memory_format=layout)
    outs, grads = [], []
    for m in (ref, ext):
        xi = x.clone().requires_grad_()
        y, a_c, a_s = m(xi)
        loss = (y * torch.cos(y)).sum() + (a_c**2).sum() + a_s.sin().sum()
        grads.append(torch.autograd.grad(loss, [xi, *m.parameters()]))
        outs.append((y, a_c, a_s))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(a.abs().max().item(), 1.0))


def test_public_op_accepts_non_contiguous_input():
    x, w1, w2, ws = inputs((2, 10, 12, 14, 2, 3))
    xs = x[:, :, ::2, 1::2]  # neither NCHW- nor NHWC-contiguous
    assert not xs.is_contiguous() and not xs.is_contiguous(memory_format=torch.channels_last)
    got = cbam(xs, w1, w2.t().contiguous().t(), ws, "ext")
    want = cbam_ref(xs, w1, w2, ws)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_cbam_gradcheck_fp64():
    x, w1, w2, ws = inputs((2, 6, 5, 4, 2, 3), torch.float64)
    args = [t.double().requires_grad_() for t in (x, w1, w2, ws)]
    assert torch.autograd.gradcheck(lambda *a: cbam(*a, "ext"), args)


def test_cbam_opcheck():
    x, w1, w2, ws = inputs((2, 6, 5, 4, 2, 3), layout=torch.channels_last)
    torch.library.opcheck(torch.ops.askd.cbam_forward.default, (x, w1, w2, ws))
    saved = torch.ops.askd.cbam_forward(x, w1, w2, ws)
    torch.library.opcheck(torch.ops.askd.cbam_backward.default, (*grads_in(x, saved[1]), x, w1, w2, ws, *saved[1:]))
    torch.library.opcheck(fused_cbam, (x, w1, w2, ws, "torch"))  # the custom op of the Python backends


def maps_for(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


LOSS_SHAPES = [(3, 64), (3, 1, 56, 56), (3, 512), (3, 1, 7, 7), (3, 5), (3, 1, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_loss_matches_contract(dtype):
    teacher, student = maps_for(LOSS_SHAPES, dtype), maps_for(LOSS_SHAPES, dtype, seed=1)
    teacher[4] = torch.zeros_like(teacher[4])  # the eps branch: a zero teacher row
    want = cosine_distill_forward_ref(teacher, student, 2.5)
    got = torch.ops.askd.cosine_distill_forward(teacher, student, 2.5)
    for name, g, w in zip(("loss", "stats"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(name, g, w, dtype)
    grad = torch.tensor(0.7, dtype=want[0].dtype)
    for j, (g, w) in enumerate(
        zip(
            torch.ops.askd.cosine_distill_backward(grad, teacher, student, want[1], 2.5),
            cosine_distill_backward_ref(grad, teacher, student, want[1], 2.5),
            strict=True,
        )
    ):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(f"d student {j}", g, w, dtype)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_loss_through_public_api_matches_reference(variant):
    blocks = [((4, 16), (4, 1, 8, 8)), ((4, 32), (4, 1, 4, 4))]
    pairs = [[tuple(maps_for(b, seed=s + i)) for i, b in enumerate(blocks)] for s in (0, 10)]
    grads = []
    for name in ("torch", "ext"):
        student = [tuple(m.clone().requires_grad_() for m in p) for p in pairs[1]]
        loss = attention_distill_loss(pairs[0], student, variant, 5.0, backend=name)
        grads.append((loss, torch.autograd.grad(loss, [m for p in student for m in p])))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_loss_teacher_gets_no_gradient_and_gradcheck():
    teacher = [m.requires_grad_() for m in maps_for([(2, 5), (2, 1, 3, 3)], torch.float64)]
    student = [m.requires_grad_() for m in maps_for([(2, 5), (2, 1, 3, 3)], torch.float64, seed=2)]
    loss = cosine_distill(teacher, student, 5.0, "ext")
    loss.backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)
    assert torch.autograd.gradcheck(lambda *s: cosine_distill(teacher, list(s), 5.0, "ext"), student)


def test_loss_opcheck():
    teacher, student = maps_for(LOSS_SHAPES[:3]), maps_for(LOSS_SHAPES[:3], seed=1)
    torch.library.opcheck(torch.ops.askd.cosine_distill_forward.default, (teacher, student, 5.0))
    loss, stats = torch.ops.askd.cosine_distill_forward(teacher, student, 5.0)
    torch.library.opcheck(
        torch.ops.askd.cosine_distill_backward.default, (torch.ones(()), teacher, student, stats, 5.0)
    )
    torch.library.opcheck(torch.ops.askd.cosine_distill_forward_grad.default, (teacher, student, 5.0))
    for with_grad in (False, True):  # autograd lives in an autograd.Function around the op, not on it
        torch.library.opcheck(fused_cosine_distill, (teacher, student, 5.0, "ext", with_grad))


def test_loss_gradients_from_the_forward_pass_scale_with_the_upstream_gradient():
    teacher, student = maps_for(LOSS_SHAPES[:3]), [m.requires_grad_() for m in maps_for(LOSS_SHAPES[:3], seed=1)]
    for upstream in (1.0, -2.5):  # 1.0 hands the forward's gradients over as they are
        got = torch.autograd.grad(upstream * cosine_distill(teacher, student, 5.0, "ext"), student)
        want = torch.autograd.grad(upstream * cosine_distill_ref(teacher, student, 5.0), student)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, w1, w2, ws: (x[0], w1, w2, ws), r"x must be \(B,C,H,W\), got shape \(8,5,5\)"),
        (lambda x, w1, w2, ws: (x.int(), w1, w2, ws), "x must be float32, float64, bfloat16 or float16, got Int"),
        (lambda x, w1, w2, ws: (x, w1[:, :3], w2, ws), r"w1 must have shape \(2,8\), got \(2,3\)"),
        (lambda x, w1, w2, ws: (x, w1, w2[:4], ws), r"w2 must have shape \(8,2\), got \(4,2\)"),
        (lambda x, w1, w2, ws: (x, w1, w2, ws[:, :2, :2]), r"ws must be \(2,3,3\) or \(2,7,7\), got \(2,2,2\)"),
        (lambda x, w1, w2, ws: (x, w1, w2, ws[:1]), r"ws must have shape \(2,3,3\), got \(1,3,3\)"),
    ],
    ids=["rank", "dtype", "w1", "w2", "ws-kernel", "ws-channels"],
)
def test_cbam_bad_input_messages(change, message):
    args = change(*inputs((2, 8, 5, 5, 2, 3)))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.askd.cbam_forward(*args)


def test_cbam_backward_checks_saved_tensors():
    x, w1, w2, ws = inputs((2, 8, 5, 5, 2, 3))
    saved = list(torch.ops.askd.cbam_forward(x, w1, w2, ws))
    grads = grads_in(x, saved[1])
    bad = saved[1:]
    bad[3] = bad[3].long()  # idx_c
    with pytest.raises(RuntimeError, match="idx_c must be Int, got Long"):
        torch.ops.askd.cbam_backward(*grads, x, w1, w2, ws, *bad)
    with pytest.raises(RuntimeError, match=r"dy must have shape \(2,8,5,5\), got \(2,8,5,4\)"):
        torch.ops.askd.cbam_backward(grads[0][..., :4], *grads[1:], x, w1, w2, ws, *saved[1:])


def test_public_cbam_names_device_mismatch():
    x, w1, w2, ws = inputs((2, 8, 5, 5, 2, 3))
    with pytest.raises(ValueError, match="ws is on meta but x is on cpu"):
        cbam(x, w1, w2, ws.to("meta"), "ext")


@pytest.mark.parametrize(
    "teacher,student,message",
    [
        ([(2, 4)], [(2, 4), (2, 3)], "need as many teacher as student maps"),
        ([(2, 4)], [(2, 5)], r"map 0: teacher shape \(2,4\) != student shape \(2,5\)"),
        ([(2, 4), (3, 4)], [(2, 4), (3, 4)], r"map 1: expected shape \(B=2, ...\), got \(3,4\)"),
    ],
    ids=["count", "shape", "batch"],
)
def test_loss_bad_maps(teacher, student, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.askd.cosine_distill_forward(maps_for(teacher), maps_for(student), 5.0)


def test_loss_mixed_dtypes_raise_in_the_op_and_are_cast_by_the_api():
    teacher, student = maps_for([(2, 4), (2, 3)]), maps_for([(2, 4), (2, 3)], seed=1)
    student[1] = student[1].double()
    with pytest.raises(RuntimeError, match=r"map 1: all maps must share one dtype \(Float\)"):
        torch.ops.askd.cosine_distill_forward(teacher, student, 5.0)
    got = cosine_distill(teacher, student, 5.0, "ext")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, cosine_distill_ref(teacher, student, 5.0).double())
    with pytest.raises(RuntimeError, match="maps must be float32, float64, bfloat16 or float16, got Long"):
        torch.ops.askd.cosine_distill_forward([t.long() for t in teacher], [s.long() for s in student], 5.0)
