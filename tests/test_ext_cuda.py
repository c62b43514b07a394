"""The CUDA kernels of ``askd._C`` against the PyTorch contracts in ``askd.ops`` (needs a GPU and a CUDA build).

Maps and statistics accumulate in float32 on both sides, so they agree tightly for every input dtype; y and dx
come back in x's dtype, so bfloat16/float16 differ by about one rounding step there.
"""

from __future__ import annotations

import pytest
import torch
from near_ties import check_argmax

from askd import _ext
from askd.ops.cbam import acc_dtype, cbam, cbam_backward_ref, cbam_forward_ref
from askd.ops.cosine_distill import cosine_distill_backward_ref, cosine_distill_forward_ref

CL = torch.channels_last
# (B, C, H, W, k, R): odd sizes, B = 1, a 1x1 map, and P >= 1024 (a block per row in the NCHW reductions)
SHAPES = [(2, 32, 7, 9, 7, 4), (1, 16, 5, 5, 3, 2), (3, 24, 1, 1, 7, 3), (2, 40, 33, 35, 7, 5), (1, 3, 4, 50, 3, 1)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# tolerances for outputs in x's dtype (rtol, atol); maps use the acc dtype's
OUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
MAP_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}


@pytest.fixture(autouse=True)
def cuda_ext(monkeypatch):
    """Skips without a GPU or a CUDA build of askd._C; turns TF32 off so the references run in full float32."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if _ext.load() is None:
        pytest.skip(f"askd._C is not importable: {_ext.error()}")
    if "CUDA on" not in torch.ops.askd.build_info():
        pytest.skip("askd._C was built without CUDA")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def close(actual, expected, tol):
    rtol, atol = tol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def make_cbam(shape, dtype, layout, wdtype=None, seed=0):
    B, C, H, W, k, R = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    wdtype = wdtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def randn(*size, dt):
        return torch.randn(*size, generator=g, device="cuda", dtype=torch.float64).to(dt)

    x = randn(B, C, H, W, dt=dtype).contiguous(memory_format=layout)
    w1, w2, ws = randn(R, C, dt=wdtype) * 0.3, randn(C, R, dt=wdtype) * 0.3, randn(2, k, k, dt=wdtype) * 0.3
    return x, w1, w2, ws


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_cbam_forward_matches_contract(shape, dtype, layout):
    x, w1, w2, ws = make_cbam(shape, dtype, layout)
    got = torch.ops.askd.cbam_forward(x, w1, w2, ws)
    ref = cbam_forward_ref(x, w1, w2, ws)
    acc = acc_dtype(dtype)
    for name, a, r in zip(("y", "a_c", "a_s", "chan", "idx_c", "pooled", "idx_s"), got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype and a.device == x.device, name
    y, a_c, a_s, chan, idx_c, pooled, idx_s = got
    close(y, ref[0], OUT_TOL[dtype])
    if layout == CL and not x.is_contiguous():
        assert y.is_contiguous(memory_format=CL)
    for a, r in ((a_c, ref[1]), (a_s, ref[2]), (chan, ref[3]), (pooled, ref[5])):
        close(a, r, MAP_TOL[acc])
    B, C, H, W = x.shape
    # idx_c: argmax over H*W of x itself, identical inputs on both sides, so exactly equal (first index on ties)
    assert torch.equal(idx_c, ref[4])
    # idx_s: argmax over C of x * g_c, where g_c may differ in the last bit
    xc = x.to(acc) * torch.sigmoid(ref[1])[:, :, None, None]
    check_argmax(idx_s.reshape(B, -1), ref[6].reshape(B, -1), xc.flatten(2).transpose(1, 2), MAP_TOL[acc])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_cbam_backward_matches_contract(shape, dtype, layout):
    x, w1, w2, ws = make_cbam(shape, dtype, layout)
    saved = cbam_forward_ref(x, w1, w2, ws)[1:]
    acc = acc_dtype(dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    dy = torch.randn(x.shape, generator=g, device="cuda").to(dtype).contiguous(memory_format=layout)
    da_c = torch.randn(saved[0].shape, generator=g, device="cuda").to(acc)
    da_s = torch.randn(saved[1].shape, generator=g, device="cuda").to(acc)
    got = torch.ops.askd.cbam_backward(dy, da_c, da_s, x, w1, w2, ws, *saved)
    ref = cbam_backward_ref(dy, da_c, da_s, x, w1, w2, ws, *saved)
    for name, a, r in zip(("dx", "dw1", "dw2", "dws"), got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
    close(got[0], ref[0], OUT_TOL[dtype])
    if layout == CL and not x.is_contiguous():
        assert got[0].is_contiguous(memory_format=CL)
    # weight gradients sum over B*H*W terms in a different order: relative 1e-4 in float32
    wtol = MAP_TOL[acc] if acc == torch.float64 else (1e-4, 1e-4)
    for a, r in zip(got[1:], ref[1:], strict=True):
        close(a, r, wtol)


@pytest.mark.parametrize("xdtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_cbam_mixed_weight_dtype(xdtype, wdtype):
    x, w1, w2, ws = make_cbam((2, 16, 6, 5, 3, 4), xdtype, CL, wdtype=wdtype)
    got = torch.ops.askd.cbam_forward(x, w1, w2, ws)
    ref = cbam_forward_ref(x, w1, w2, ws)
    close(got[0], ref[0], OUT_TOL[xdtype])
    close(got[1], ref[1], MAP_TOL[torch.float32])
    dy = torch.ones_like(x)
    da_c, da_s = torch.zeros_like(ref[1]), torch.zeros_like(ref[2])
    dgot = torch.ops.askd.cbam_backward(dy, da_c, da_s, x, w1, w2, ws, *ref[1:])
    dref = cbam_backward_ref(dy, da_c, da_s, x, w1, w2, ws, *ref[1:])
    for a, r in zip(dgot, dref, strict=True):
        assert a.dtype == r.dtype
        close(a.float(), r.float(), (2e-2, 2e-2))


def test_cbam_ties_take_first_index():
    # constant x and w2 = 0 (so g_c = 1/2 everywhere): every pixel ties for the channel max, every channel for
    # the spatial max
    x = torch.ones(2, 8, 4, 5, device="cuda")
    _, w1, w2, ws = make_cbam((2, 8, 4, 5, 3, 2), torch.float32, torch.contiguous_format)
    w2 = torch.zeros_like(w2)
    ref = cbam_forward_ref(x, w1, w2, ws)
    for layout in (torch.contiguous_format, CL):
        *_, idx_c, _, idx_s = torch.ops.askd.cbam_forward(x.contiguous(memory_format=layout), w1, w2, ws)
        assert torch.equal(idx_c, ref[4]) and not idx_c.any()
        assert torch.equal(idx_s, ref[6]) and not idx_s.any()


def test_cbam_autograd_through_ext_matches_reference():
    x, w1, w2, ws = make_cbam((2, 16, 9, 7, 7, 4), torch.float32, CL)
    grads = {}
    for backend in ("ext", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, ws)]
        y, a_c, a_s = cbam(*leaves, backend=backend)
        (y.square().sum() + a_c.sin().sum() + a_s.cos().sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for a, r in zip(grads["ext"], grads["torch"], strict=True):
        close(a, r, (1e-4, 1e-4))


def test_cbam_rejects_bad_kernel_size():
    x, w1, w2, _ = make_cbam((1, 8, 4, 4, 3, 2), torch.float32, torch.contiguous_format)
    with pytest.raises(RuntimeError, match=r"ws must be \(2,3,3\) or \(2,7,7\)"):
        torch.ops.askd.cbam_forward(x, w1, w2, torch.zeros(2, 5, 5, device="cuda"))


# ---------------------------------------------------------------------------------------------------------------
# the distillation loss


def make_maps(B, dims, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    teacher, student = [], []
    for d in dims:
        shape = (B, *d) if isinstance(d, tuple) else (B, d)
        teacher.append(torch.randn(shape, generator=g, device="cuda", dtype=torch.float64).to(dtype))
        student.append(torch.randn(shape, generator=g, device="cuda", dtype=torch.float64).to(dtype))
    return teacher, student


# channel maps (B, C), spatial maps (B, 1, H, W), a one-value row and a long one
DIMS = [64, (1, 7, 7), 1, 513, (1, 56, 56), 128]


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distill_forward_backward_match_contract(B, dtype):
    teacher, student = make_maps(B, DIMS, dtype)
    scale = 0.75
    loss, stats = torch.ops.askd.cosine_distill_forward(teacher, student, scale)
    loss_ref, stats_ref = cosine_distill_forward_ref(teacher, student, scale)
    acc = acc_dtype(dtype)
    assert loss.shape == () and loss.dtype == acc and stats.shape == (len(DIMS), B, 3) and stats.dtype == acc
    tol = MAP_TOL[acc] if acc == torch.float64 else (1e-5, 1e-4)
    close(stats, stats_ref, tol)
    close(loss, loss_ref, tol)
    grad = torch.tensor(1.5, device="cuda", dtype=acc)
    got = torch.ops.askd.cosine_distill_backward(grad, teacher, student, stats_ref, scale)
    ref = cosine_distill_backward_ref(grad, teacher, student, stats_ref, scale)
    for a, r, s in zip(got, ref, student, strict=True):
        assert a.shape == s.shape and a.dtype == s.dtype
        close(a, r, OUT_TOL[dtype])


def test_distill_many_maps_use_the_device_table():
    # more maps than fit in the kernel's parameters (96): the table goes through one H2D copy
    teacher, student = make_maps(3, [17 + j % 5 for j in range(130)], torch.float32)
    loss, stats = torch.ops.askd.cosine_distill_forward(teacher, student, 1.0)
    loss_ref, stats_ref = cosine_distill_forward_ref(teacher, student, 1.0)
    close(stats, stats_ref, (1e-5, 1e-5))
    close(loss, loss_ref, (1e-5, 1e-5))
    grad = torch.tensor(1.0, device="cuda")
    got = torch.ops.askd.cosine_distill_backward(grad, teacher, student, stats_ref, 1.0)
    for a, r in zip(got, cosine_distill_backward_ref(grad, teacher, student, stats_ref, 1.0), strict=True):
        close(a, r, (2e-5, 2e-5))


def test_distill_zero_teacher_takes_the_eps_branch():
    teacher, student = make_maps(4, [32, (1, 5, 5)], torch.float32)
    teacher[0][1].zero_()
    loss, stats = torch.ops.askd.cosine_distill_forward(teacher, student, 2.0)
    loss_ref, stats_ref = cosine_distill_forward_ref(teacher, student, 2.0)
    close(loss, loss_ref, (1e-5, 1e-5))
    grad = torch.tensor(1.0, device="cuda")
    got = torch.ops.askd.cosine_distill_backward(grad, teacher, student, stats, 2.0)
    ref = cosine_distill_backward_ref(grad, teacher, student, stats_ref, 2.0)
    for a, r in zip(got, ref, strict=True):
        close(a, r, (2e-5, 2e-5))


def test_distill_is_deterministic():
    teacher, student = make_maps(8, DIMS, torch.float32)
    first = torch.ops.askd.cosine_distill_forward(teacher, student, 1.0)
    for _ in range(3):
        again = torch.ops.askd.cosine_distill_forward(teacher, student, 1.0)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_distill_non_contiguous_maps():
    teacher, student = make_maps(4, [(6, 5)], torch.float32)
    teacher, student = [teacher[0].transpose(1, 2)], [student[0].transpose(1, 2)]
    loss, stats = torch.ops.askd.cosine_distill_forward(teacher, student, 1.0)
    loss_ref, stats_ref = cosine_distill_forward_ref(teacher, student, 1.0)
    close(stats, stats_ref, (1e-5, 1e-5))
    grad = torch.tensor(1.0, device="cuda")
    got = torch.ops.askd.cosine_distill_backward(grad, teacher, student, stats, 1.0)
    close(got[0], cosine_distill_backward_ref(grad, teacher, student, stats_ref, 1.0)[0], (2e-5, 2e-5))


def test_distill_rejects_mixed_dtypes():
    teacher, student = make_maps(2, [8, 8], torch.float32)
    student[1] = student[1].double()
    with pytest.raises(RuntimeError, match="all maps must share one dtype"):
        torch.ops.askd.cosine_distill_forward(teacher, student, 1.0)
