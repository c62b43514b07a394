"""Edge cases on which every backend must agree with PyTorch: an empty batch, a dtype mismatch (and autocast),
and NaN inputs, for CBAM and the distillation loss.

Backends: ``torch`` (the module's own PyTorch code, the reference), ``ext`` (the compiled kernels) and ``triton``
(under ``TRITON_INTERPRET=1`` on the CPU without a GPU, see conftest.py), on the CPU and, where there is one, the
GPU; each pair is skipped where it cannot run. The op-level tests also run the ops' ``reference`` backend (the
written-out contract in :mod:`askd.ops`).

NaN: the max-pools rank NaN above every number as ``torch.max`` does (the max is NaN, the argmax its first
NaN), relu lets NaN through, and a NaN anywhere in a loss row makes that row's gradient NaN. What is compared
is where the NaNs are (y, both maps, dx, the weight gradients, the argmaxes), not the finite values.
"""

from __future__ import annotations

import pytest
import torch

from askd import backend as backends
from askd.losses import attention_distill_loss
from askd.nn import CBAM
from askd.ops import cbam as cbam_ops
from askd.ops import cosine_distill as distill_ops
from askd.ops.cbam import cbam_backward_ref, cbam_forward_ref
from askd.ops.cosine_distill import cosine_distill

NAN = float("nan")
# the GPU joins where there is one: the CUDA kernels and compiled Triton then face the same cases
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
FWD_NAMES = ("y", "a_c", "a_s", "chan", "idx_c", "pooled", "idx_s")
BWD_NAMES = ("dx", "dw1", "dw2", "dws")
MODULE_NAMES = ("y", "a_c", "a_s", "dx", "dw1", "dw2", "dws")  # run_module's outputs and gradients


def backend_params(names: tuple[str, ...]) -> list:
    """(device, backend) for every device and name, skipped where the backend cannot run on the device."""
    params = []
    for device in DEVICES:
        reasons = backends.availability(device)
        for name in names:
            reason = reasons[name]
            skip = pytest.mark.skipif(reason is not None, reason=f"{name} on {device}: {reason}")
            params.append(pytest.param(device, name, marks=skip, id=f"{device}-{name}"))
    return params


FUSED = pytest.mark.parametrize("device,backend", backend_params(("ext", "triton")))
OPS = pytest.mark.parametrize("device,backend", backend_params(("torch", "ext", "triton")))
ALL = pytest.mark.parametrize("device,backend", backend_params(("torch", "ext", "triton")))


def cbam_impl(name: str):
    """forward/backward of one op-level CBAM backend (the raw compiled ops, the Triton module, the reference), as
    the op dispatches to them."""
    return cbam_ops.backend_impl(name)


def distill_impl(name: str):
    """forward/backward of one op-level loss backend, as the op dispatches to them."""
    return distill_ops.backend_impl(name)


def modules(device: str, backend: str, channels: int = 8, reduction: int = 2, dtype=torch.float32):
    """(torch module, ``backend`` module) on ``device`` with the same weights."""
    torch.manual_seed(0)
    ref = CBAM(channels, reduction=reduction).to(device, dtype)
    other = CBAM(channels, reduction=reduction, backend=backend).to(device, dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


def run_module(m: CBAM, x: torch.Tensor):
    """y, a_c, a_s and the gradients of x and every parameter for a loss touching all three outputs."""
    x = x.detach().clone().requires_grad_()
    y, a_c, a_s = m(x)
    loss = y.float().sum() + a_c.float().square().sum() + a_s.float().sin().sum()
    return (y, a_c, a_s), torch.autograd.grad(loss, [x, *m.parameters()])


def op_inputs(device, B=2, C=40, H=5, W=7, R=3, k=3, seed=0):
    """x (B,C,H,W), w1 (R,C), w2 (C,R), ws (2,k,k) in float32 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    w1, w2, ws = (torch.randn(*s, generator=g) / s[-1] ** 0.5 for s in ((R, C), (C, R), (2, k, k)))
    return x.to(device), w1.to(device), w2.to(device), ws.to(device)


def assert_same_nans(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: {int(got.isnan().sum())} NaNs where PyTorch has {int(want.isnan().sum())}"
    )


# ---------------------------------------------------------------------------------------------------------------
# CBAM, empty batch


@LAYOUTS
@FUSED
def test_cbam_empty_batch_matches_torch(device, backend, layout):
    ref, other = modules(device, backend)
    x = torch.randn(0, 8, 5, 4, device=device).contiguous(memory_format=layout)
    (want, want_grads), (got, got_grads) = run_module(ref, x), run_module(other, x)
    for name, g, w in zip(MODULE_NAMES, got + got_grads, want + want_grads, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, msg=name)  # the weight gradients: zeros, as a sum over no samples


@OPS
def test_cbam_op_empty_batch_returns_empty_outputs(device, backend, monkeypatch):
    if backend == "triton":
        # no kernel may be launched on the empty batch
        module = cbam_impl("triton")
        for name in [n for n in dir(module) if n.startswith("_cbam_") and n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, None)  # indexing None (kernel[grid]) would raise
    x, w1, w2, ws = op_inputs(device, B=0, C=6, H=4, W=3, R=2)
    impl = cbam_impl(backend)
    out = impl.forward(x, w1, w2, ws)
    shapes = [(0, 6, 4, 3), (0, 6), (0, 1, 4, 3), (0, 2, 6), (0, 6), (0, 2, 4, 3), (0, 4, 3)]
    dtypes = [torch.float32] * 4 + [torch.int32, torch.float32, torch.int32]
    for name, t, shape, dtype in zip(FWD_NAMES, out, shapes, dtypes, strict=True):
        assert tuple(t.shape) == shape and t.dtype == dtype, name
    da_c, da_s = torch.empty(0, 6, device=device), torch.empty(0, 1, 4, 3, device=device)
    grads = impl.backward(torch.empty_like(x), da_c, da_s, x, w1, w2, ws, *out[1:])
    for name, g, like in zip(BWD_NAMES, grads, (x, w1, w2, ws), strict=True):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert not g.any(), name


@FUSED
def test_cbam_op_rejects_empty_spatial_size(device, backend):
    x, w1, w2, ws = op_inputs(device, B=2, C=6, H=0, W=3, R=2)
    with pytest.raises(ValueError, match=r"x must have C, H and W > 0, got shape \(2, 6, 0, 3\)"):
        CBAM(6, reduction=3, backend=backend).to(device)(x)
    if backend == "ext":
        with pytest.raises(RuntimeError, match=r"x must have C, H and W > 0, got shape \(2,6,0,3\)"):
            torch.ops.askd.cbam_forward(x, w1, w2, ws)


# ---------------------------------------------------------------------------------------------------------------
# CBAM, dtype of x against the weights'


@pytest.mark.parametrize(
    "xdtype,wdtype",
    [(torch.float64, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
    ids=["f64-into-f32", "bf16-into-f32", "f32-into-f64"],
)
@FUSED
def test_cbam_dtype_mismatch_raises_like_torch(device, backend, xdtype, wdtype):
    ref, other = modules(device, backend, dtype=wdtype)
    x = torch.randn(2, 8, 4, 4, dtype=xdtype, device=device)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(ValueError, match=f"x is {xdtype} but w1 is {wdtype}; PyTorch's CBAM raises"):
        other(x)


@FUSED
def test_cbam_matching_dtypes_run(device, backend):
    for dtype in (torch.float64, torch.bfloat16):
        ref, other = modules(device, backend, dtype=dtype)
        x = torch.randn(2, 8, 4, 4, dtype=dtype, device=device)
        for g, w in zip(other(x), ref(x), strict=True):
            torch.testing.assert_close(g.to(w.dtype), w, rtol=2e-2, atol=2e-2)


@FUSED
def test_cbam_under_autocast_casts_as_torch(device, backend):
    # bfloat16 autocast: torch's convolutions take float32 and bfloat16 x with float32 weights, but leave a
    # float64 x alone, which then mismatches the bfloat16 weights; the fused backends follow
    ref, other = modules(device, backend)
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1)).to(device, xdtype)
        with torch.autocast(device, dtype=torch.bfloat16):
            run_module(ref, x)
            got = run_module(other, x)
        assert got[0][0].dtype == xdtype and got[0][1].dtype == got[0][2].dtype == torch.float32
        if xdtype == torch.float32:
            # the fused op keeps its maps and gradients in acc under autocast: the same as without it
            want = run_module(other, x)
            for g, w in zip(got[0] + got[1], want[0] + want[1], strict=True):
                assert g.dtype == w.dtype
                torch.testing.assert_close(g, w)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref(x)
        with pytest.raises(ValueError, match="x is torch.float64 but w1 is torch.float32 under autocast"):
            other(x)


# ---------------------------------------------------------------------------------------------------------------
# CBAM, NaN


def nan_inputs(case: str) -> torch.Tensor:
    """x (2,8,4,4) as in the bug report (one NaN in sample 0), or (3,40,5,7): NaNs in SIMD lanes and tails."""
    if case == "report":
        x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
        x[0, 3, 2, 2] = NAN
        return x
    x = torch.randn(3, 40, 5, 7, generator=torch.Generator().manual_seed(0))
    x[0, 7, 2, 4] = NAN  # p = 18, a later lane
    x[0, 7, 0, 5] = NAN  # p = 5: the first NaN of the row, in an earlier lane
    x[2, 39, 4, 5] = NAN  # p = 33, the tail of a 35-long row, in the last channel
    return x


@LAYOUTS
@pytest.mark.parametrize("case", ["report", "lanes"])
@FUSED
def test_cbam_nan_positions_match_torch(device, backend, case, layout):
    x = nan_inputs(case).to(device).contiguous(memory_format=layout)
    ref, other = modules(device, backend, channels=x.shape[1], reduction=2 if case == "report" else 8)
    (want, want_grads), (got, got_grads) = run_module(ref, x), run_module(other, x)
    for name, g, w in zip(MODULE_NAMES, got + got_grads, want + want_grads, strict=True):
        assert_same_nans(name, g, w)
    if case == "report":
        assert want[0][0].isnan().all() and want[1][0].isnan().all()  # the NaN spreads over sample 0
    assert not got[0][1].isnan().any()  # and no further than its sample


def nan_weights_case(x, w1, w2, ws):
    # NaN rows 18 and 5 of w2: a_c and g_c NaN at channels 5 and 18, so every pixel's spatial max is NaN, first at
    # channel 5 (lanes 5 and 2 of a 16-lane scan over C = 40 in channels_last)
    w2 = w2.clone()
    w2[18] = NAN
    w2[5] = NAN
    return x, w1, w2, ws


def nan_x_case(x, w1, w2, ws):
    x = x.clone()
    x[0, 7].view(-1)[[18, 5]] = NAN  # first NaN at p = 5, behind one at p = 18 in a later lane
    x[1, 2].view(-1)[33] = NAN  # the tail of a 35-long row
    x[1, 30].view(-1)[[0, 34]] = NAN
    return x, w1, w2, ws


@LAYOUTS
@pytest.mark.parametrize("case", [nan_x_case, nan_weights_case], ids=["nan-x", "nan-w2"])
@OPS
def test_cbam_op_nan_argmax_matches_torch_max(device, backend, case, layout):
    x, w1, w2, ws = case(*op_inputs(device))
    x = x.contiguous(memory_format=layout)
    want = cbam_forward_ref(x, w1, w2, ws)
    got = cbam_impl(backend).forward(x, w1, w2, ws)
    for name, g, w in zip(FWD_NAMES, got, want, strict=True):
        if name.startswith("idx"):
            assert torch.equal(g, w), f"{name}: argmax differs from torch.max's"
        else:
            assert_same_nans(name, g, w)
    if case is nan_weights_case:
        assert (want[6] == 5).all()
    else:
        assert want[4][0, 7] == 5 and want[4][1, 2] == 33 and want[4][1, 30] == 0
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g).to(device).contiguous(memory_format=layout)
    da_c, da_s = (torch.randn(want[i].shape, generator=g).to(device) for i in (1, 2))
    want_grads = cbam_backward_ref(dy, da_c, da_s, x, w1, w2, ws, *want[1:])
    got_grads = cbam_impl(backend).backward(dy, da_c, da_s, x, w1, w2, ws, *got[1:])
    for name, g, w in zip(BWD_NAMES, got_grads, want_grads, strict=True):
        assert_same_nans(name, g, w)


# ---------------------------------------------------------------------------------------------------------------
# the distillation loss


def loss_maps(device, B=3, seed=0):
    """One CBAM block's (channel (B,6), spatial (B,1,2,2)) maps for the teacher and the student."""
    g = torch.Generator().manual_seed(seed)
    teacher, student = (
        tuple(torch.randn(shape, generator=g).to(device) for shape in ((B, 6), (B, 1, 2, 2))) for _ in range(2)
    )
    return [teacher], [student]


@ALL
def test_loss_empty_batch_raises_in_every_backend(device, backend):
    teacher, student = loss_maps(device, B=0)
    with pytest.raises(ValueError, match="the distillation loss needs at least one sample, got batch size 0"):
        attention_distill_loss(teacher, student, backend=backend)


@OPS
def test_loss_op_empty_batch_raises(device, backend):
    teacher, student = loss_maps(device, B=0)
    with pytest.raises(ValueError, match="needs at least one sample, got batch size 0"):
        cosine_distill(list(teacher[0]), list(student[0]), 5.0, backend)
    if backend == "torch":
        return
    error = RuntimeError if backend == "ext" else ValueError
    with pytest.raises(error, match="needs at least one sample, got batch size 0"):
        distill_impl(backend).forward(list(teacher[0]), list(student[0]), 5.0)


def nan_loss_maps(device, where: str):
    teacher, student = loss_maps(device)
    if where in ("student", "both"):
        student[0][0][1, 2] = NAN
    if where in ("teacher", "both"):
        teacher[0][1][2, 0, 1, 1] = NAN
    return teacher, student


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@FUSED
def test_loss_nan_positions_match_torch(device, backend, where):
    teacher, student = nan_loss_maps(device, where)
    results = []
    for name in ("torch", backend):
        leaves = [tuple(m.clone().requires_grad_() for m in pair) for pair in student]
        loss = attention_distill_loss(teacher, leaves, backend=name)
        results.append((loss, *torch.autograd.grad(loss, [m for pair in leaves for m in pair])))
    for name, g, w in zip(("loss", "d channel map", "d spatial map"), results[1], results[0], strict=True):
        assert_same_nans(name, g, w)
    assert results[0][1].isnan().any(dim=1).sum() == (where != "teacher")  # whole rows, in PyTorch too


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
@OPS
def test_loss_op_nan_rows_match_autograd(device, backend, where):
    teacher, student = nan_loss_maps(device, where)
    teacher, student = list(teacher[0]), list(student[0])
    leaves = [s.clone().requires_grad_() for s in student]
    want_loss = attention_distill_loss([tuple(teacher)], [tuple(leaves)], backend="torch")
    want = torch.autograd.grad(2.0 * want_loss, leaves)
    impl = distill_impl(backend)
    loss, stats = impl.forward(teacher, student, 5.0)
    assert_same_nans("loss", loss, want_loss)
    got = impl.backward(torch.tensor(2.0, device=device), teacher, student, stats, 5.0)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_nans(f"d student {j}", g, w)
