"""Fused CBAM (:mod:`askd.ops.cbam`) on every backend and device against its references.

The contract (``cbam_forward_ref`` / ``cbam_backward_ref``): every forward output and gradient in dtype, layout and
value, both argmaxes, for float64 / float32 (tight) and bfloat16 / float16 (``op_cases.TOL``), odd shapes, B = 1,
IR-50's stage shapes, mixed x and weight dtypes, ties (first index), NaN (ranked above every number, as
``torch.max`` does) and an empty batch. The public op and the module against the formula (``cbam_ref``) and the
torch backend: non-contiguous and channels_last input, fp64 gradcheck, dtype mismatches and autocast as PyTorch
has them, NaN positions. ``torch.library.opcheck`` of the registered ops, ``torch.compile(fullgraph=True)``, the
compiled extension's own error messages and build info, and the Triton kernels compiled for a GPU.

Cases run as (backend, device), see tests/op_cases.py. The Triton interpreter (Triton on the CPU) is slow, so the
shapes stay small: IR-50's stages at B = 2, the three largest at B = 1 under the interpreter.
"""

from __future__ import annotations

import re

import pytest
import torch
from near_ties import check_argmax
from op_cases import (
    ALL,
    DTYPES,
    EXT,
    FUSED,
    NAN,
    TOL,
    assert_close,
    assert_kernels_compile_for_a_gpu,
    assert_same_nans,
    interpreted,
)

from askd.nn import CBAM
from askd.numerics import memory_format
from askd.ops.cbam import (
    backend_impl,
    cbam,
    cbam_backward_ref,
    cbam_forward_ref,
    cbam_ref,
    fused_cbam,
    fused_cbam_backward,
)
from askd.ops.cosine_distill import cosine_distill

pytestmark = pytest.mark.usefixtures("no_tf32")

FWD_NAMES = ("y", "a_c", "a_s", "chan", "idx_c", "pooled", "idx_s")
BWD_NAMES = ("dx", "dw1", "dw2", "dws")
GRAD_NAMES = ("y", "a_c", "a_s", "dx", "dw1", "dw2", "dws")  # outputs_and_grads' results
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
LAYOUT = pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
# (B, C, H, W, R, k): B = 1, primes (13x7x5 at B = 1 and 2 with both spatial kernels), C = 1, 1x1 maps, a single
# pixel, a long thin map, a 33x35 one (P >= 1024: a block per row in the CUDA kernels' NCHW reductions)
SHAPES = [
    (1, 13, 7, 5, 1, 3),
    (1, 13, 7, 5, 1, 7),
    (2, 13, 7, 5, 1, 3),
    (2, 13, 7, 5, 1, 7),
    (2, 12, 5, 7, 3, 7),
    (2, 11, 3, 5, 1, 7),
    (3, 1, 4, 4, 1, 3),
    (2, 8, 1, 1, 2, 3),
    (3, 24, 1, 1, 3, 7),
    (1, 1, 1, 1, 1, 3),
    (2, 32, 7, 9, 4, 7),
    (1, 16, 5, 5, 2, 3),
    (2, 24, 9, 11, 3, 3),
    (1, 3, 4, 50, 1, 3),
    (2, 40, 33, 35, 5, 7),
]
# IR-50's four CBAM stages: float32 in both layouts, bfloat16 / float16 at two (low precision over many channels)
STAGES = [(2, 64, 56, 56, 4, 3), (2, 128, 28, 28, 8, 7), (2, 256, 14, 14, 16, 3), (2, 512, 7, 7, 32, 7)]
STAGE_CASES = [(s, torch.float32, name) for s in STAGES for name in LAYOUTS]
STAGE_CASES += [(STAGES[1], torch.bfloat16, "nchw"), (STAGES[2], torch.float16, "nhwc")]
LARGE = {*STAGES[:3], SHAPES[-1]}  # the largest C*H*W


def case_id(shape, dtype, layout_name):
    return f"{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}-{layout_name}"


CONTRACT_CASES = [
    pytest.param(shape, dtype, LAYOUTS[name], id=case_id(shape, dtype, name))
    for shape, dtype, name in [(s, d, n) for s in SHAPES for d in DTYPES for n in LAYOUTS] + STAGE_CASES
]


def inputs(shape, device, dtype=torch.float32, layout=torch.contiguous_format, wdtype=None, seed=0):
    """x (B,C,H,W) in ``dtype`` and ``layout``; w1 (R,C), w2 (C,R), ws (2,k,k) in ``wdtype`` (default: x's acc
    dtype) at the scale of a trained block."""
    B, C, H, W, R, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(device, dtype).contiguous(memory_format=layout)
    wdtype = wdtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    w1, w2, ws = (torch.randn(s, generator=g).div(s[-1] ** 0.5).to(device, wdtype) for s in ((R, C), (C, R), (2, k, k)))
    return x, w1, w2, ws


def grads_in(x, want, seed=1):
    """dy (like x, in its layout, as the glue hands it over), da_c and da_s (like the reference's maps)."""
    g = torch.Generator().manual_seed(seed)

    def randn(like):
        return torch.randn(like.shape, generator=g).to(like.device, like.dtype)

    return randn(x).contiguous(memory_format=memory_format(x)), randn(want[1]), randn(want[2])


def check_idx_s(idx_s, want, x):
    """idx_s, the argmax over C of x * g_c: exact on the CPU; on a GPU g_c may differ from the reference's in the
    last bit, so a near-tie may go the other way."""
    if x.device.type == "cpu":
        assert torch.equal(idx_s, want[6]), "idx_s differs"
        return
    B, acc = x.shape[0], want[1].dtype
    xc = x.to(acc) * torch.sigmoid(want[1])[:, :, None, None]
    check_argmax(idx_s.reshape(B, -1), want[6].reshape(B, -1), xc.flatten(2).transpose(1, 2), TOL[acc])


def strides(t):
    """t's strides along its dims longer than 1: the layout. A size-1 dim is never stepped along, so its stride may
    differ (a 1x1 channels_last x is NCHW-contiguous too, and a kernel may lay its y out either way)."""
    return tuple(s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1)


def check_contract(backend, x, w1, w2, ws):
    """``backend``'s forward and backward against cbam_forward_ref / cbam_backward_ref: every output and gradient
    in dtype, layout and value, both argmaxes. Returns the reference's forward outputs."""
    impl = backend_impl(backend)
    want = cbam_forward_ref(x, w1, w2, ws)
    for name, g, w in zip(FWD_NAMES, impl.forward(x, w1, w2, ws), want, strict=True):
        assert strides(g) == strides(w), f"{name}: strides {g.stride()} != {w.stride()}"
        if name == "idx_s":
            check_idx_s(g, want, x)
        else:
            assert_close(name, g, w)
    # both backwards get the reference's statistics, so a near-tie in the forward cannot change the gradients
    args = (*grads_in(x, want), x, w1, w2, ws, *want[1:])
    for name, g, w in zip(BWD_NAMES, impl.backward(*args), cbam_backward_ref(*args), strict=True):
        assert strides(g) == strides(w), f"{name}: strides {g.stride()} != {w.stride()}"
        assert_close(name, g, w)
    return want


def outputs_and_grads(fn, x, params):
    """fn(x)'s (y, a_c, a_s) and the gradients of x and ``params`` for a loss touching all three outputs."""
    x = x.detach().requires_grad_()
    y, a_c, a_s = fn(x)
    loss = y.float().square().sum() + a_c.float().sin().sum() + a_s.float().cos().sum()
    return (y, a_c, a_s, *torch.autograd.grad(loss, [x, *params]))


def modules(device, backend, channels=8, reduction=2, dtype=torch.float32, **kwargs):
    """(torch module, ``backend`` module) on ``device`` with the same weights."""
    torch.manual_seed(0)
    ref = CBAM(channels, reduction=reduction, **kwargs).to(device, dtype)
    other = CBAM(channels, reduction=reduction, backend=backend, **kwargs).to(device, dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


def run_module(m, x):
    return outputs_and_grads(m, x, list(m.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# the contract


@pytest.mark.parametrize("shape,dtype,layout", CONTRACT_CASES)
@ALL
def test_matches_contract(backend, device, shape, dtype, layout):
    if interpreted(backend, device) and shape in LARGE:
        shape = (1, *shape[1:])  # the interpreter's time grows with B, and the small shapes cover B > 1
    check_contract(backend, *inputs(shape, device, dtype, layout))


# x and weight dtypes the ops take (any float weights; they compute in x's acc dtype) and the module refuses
MIXED = {"bf16-x": (torch.bfloat16, torch.float32), "bf16-weights": (torch.float32, torch.bfloat16)}
MIXED["f64-x"] = (torch.float64, torch.float32)


@pytest.mark.parametrize("xdtype,wdtype", MIXED.values(), ids=list(MIXED))
@ALL
def test_mixed_weight_dtypes_match_contract(backend, device, xdtype, wdtype):
    # the gradients come back in the weights' dtype
    check_contract(backend, *inputs((2, 16, 6, 5, 4, 3), device, xdtype, torch.channels_last, wdtype))


@LAYOUT
@ALL
def test_ties_take_the_first_index(backend, device, layout):
    # three distinct values: most channel and pixel maxima are tied; sample 0 is constant, all ties
    x, w1, w2, ws = inputs((2, 19, 9, 7, 1, 3), device)
    x = torch.randint(-1, 2, x.shape, generator=torch.Generator().manual_seed(3)).to(x)
    x[0] = 1.0
    want = check_contract(backend, x.contiguous(memory_format=layout), w1, w2, ws)
    assert not want[4][0].any()  # every channel's maximum of the constant sample at pixel 0


@LAYOUT
@ALL
def test_constant_input_takes_index_zero(backend, device, layout):
    # w2 = 0 makes g_c = 1/2 exactly, so every channel ties for the spatial max exactly, on a GPU too
    x, w1, w2, ws = inputs((2, 8, 4, 5, 2, 3), device, layout=layout)
    x, w2 = torch.ones_like(x), torch.zeros_like(w2)
    got = backend_impl(backend).forward(x, w1, w2, ws)
    assert not got[4].any() and not got[6].any()
    check_contract(backend, x, w1, w2, ws)


@ALL
def test_empty_batch_gives_empty_outputs(backend, device, monkeypatch):
    if backend == "triton":
        # no kernel may be launched on the empty batch
        module = backend_impl("triton")
        for name in [n for n in dir(module) if n.startswith("_cbam_") and n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, None)  # indexing None (kernel[grid]) would raise
    x, w1, w2, ws = inputs((0, 6, 4, 3, 2, 3), device)
    impl = backend_impl(backend)
    out = impl.forward(x, w1, w2, ws)
    shapes = [(0, 6, 4, 3), (0, 6), (0, 1, 4, 3), (0, 2, 6), (0, 6), (0, 2, 4, 3), (0, 4, 3)]
    dtypes = [torch.float32] * 4 + [torch.int32, torch.float32, torch.int32]
    for name, t, shape, dtype in zip(FWD_NAMES, out, shapes, dtypes, strict=True):
        assert tuple(t.shape) == shape and t.dtype == dtype, name
    grads = impl.backward(*grads_in(x, out), x, w1, w2, ws, *out[1:])
    for name, g, like in zip(BWD_NAMES, grads, (x, w1, w2, ws), strict=True):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert not g.any(), name  # the weight gradients: zeros, as a sum over no samples


def nan_weights_case(x, w1, w2, ws):
    # NaN rows 18 and 5 of w2: a_c and g_c NaN at channels 5 and 18, so every pixel's spatial max is NaN, first at
    # channel 5 (lanes 5 and 2 of a 16-lane scan over C = 40 in channels_last)
    w2 = w2.clone()
    w2[[18, 5]] = NAN
    return x, w1, w2, ws


def nan_x_case(x, w1, w2, ws):
    x = x.clone()
    x[0, 7].view(-1)[[18, 5]] = NAN  # first NaN at p = 5, behind one at p = 18 in a later lane
    x[1, 2].view(-1)[33] = NAN  # the tail of a 35-long row
    x[1, 30].view(-1)[[0, 34]] = NAN
    return x, w1, w2, ws


@LAYOUT
@pytest.mark.parametrize("case", [nan_x_case, nan_weights_case], ids=["nan-x", "nan-w2"])
@ALL
def test_nan_argmax_matches_torch_max(backend, device, case, layout):
    x, w1, w2, ws = case(*inputs((2, 40, 5, 7, 3, 3), device))
    x = x.contiguous(memory_format=layout)
    impl = backend_impl(backend)
    want = cbam_forward_ref(x, w1, w2, ws)
    got = impl.forward(x, w1, w2, ws)
    for name, g, w in zip(FWD_NAMES, got, want, strict=True):
        if name.startswith("idx"):
            assert torch.equal(g, w), f"{name}: argmax differs from torch.max's"
        else:
            assert_same_nans(name, g, w)
    if case is nan_weights_case:
        assert (want[6] == 5).all()
    else:
        assert want[4][0, 7] == 5 and want[4][1, 2] == 33 and want[4][1, 30] == 0
    args = (*grads_in(x, want), x, w1, w2, ws)
    for name, g, w in zip(BWD_NAMES, impl.backward(*args, *got[1:]), cbam_backward_ref(*args, *want[1:]), strict=True):
        assert_same_nans(name, g, w)


# ---------------------------------------------------------------------------------------------------------------
# the public op and the module


VIEWS = {
    "strided": lambda x: x[:, :, ::2, 1::2],  # neither NCHW- nor NHWC-contiguous
    "transposed": lambda x: x.transpose(2, 3),
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("view", VIEWS.values(), ids=list(VIEWS))
@ALL
def test_public_op_matches_formula(backend, device, view):
    # the glue lays x out for the kernels and hands its gradient back in the view's shape; w2 comes in transposed
    x, w1, w2, ws = inputs((2, 11, 10, 14, 2, 3), device)
    params = [w.requires_grad_() for w in (w1, w2.t().contiguous().t(), ws)]
    want = outputs_and_grads(lambda x: cbam_ref(x, *params), view(x), params)
    got = outputs_and_grads(lambda x: cbam(x, *params, backend), view(x), params)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert_close(name, g, w)


@LAYOUT
@pytest.mark.parametrize("k,maps", [(3, "logits"), (7, "sigmoid")], ids=["official", "paper"])
@FUSED
def test_module_matches_torch_module(backend, device, k, maps, layout):
    ref, other = modules(device, backend, 32, reduction=4, spatial_kernel=k, maps=maps)
    x = torch.randn(3, 32, 10, 9, generator=torch.Generator().manual_seed(1)).to(device)
    x = x.contiguous(memory_format=layout)
    for name, g, w in zip(GRAD_NAMES, run_module(other, x), run_module(ref, x), strict=True):
        assert_close(name, g, w)


@ALL
def test_gradcheck_fp64(backend, device):
    x, w1, w2, ws = inputs((2, 6, 5, 4, 2, 3), device, torch.float64)
    args = [t.requires_grad_() for t in (x, w1, w2, ws)]
    # the interpreter takes ~35 s for the full Jacobian: one random projection of it there
    fast = interpreted(backend, device)
    assert torch.autograd.gradcheck(lambda *a: cbam(*a, backend), args, fast_mode=fast)


@ALL
def test_opcheck(backend, device):
    # ext's compiled ops carry their own schema and fakes; the Python backends run inside the custom ops
    x, w1, w2, ws = inputs((2, 6, 5, 4, 2, 3), device, layout=torch.channels_last)
    want = cbam_forward_ref(x, w1, w2, ws)
    backward_args = (*grads_in(x, want), x, w1, w2, ws, *want[1:])
    if backend == "ext":
        torch.library.opcheck(torch.ops.askd.cbam_forward.default, (x, w1, w2, ws))
        torch.library.opcheck(torch.ops.askd.cbam_backward.default, backward_args)
    else:
        # autograd lives in an autograd.Function around the ops, not on them: inputs without requires_grad
        torch.library.opcheck(fused_cbam, (x, w1, w2, ws, backend))
        torch.library.opcheck(fused_cbam_backward, (*backward_args, backend))


@ALL
def test_compile_fullgraph_with_the_loss(backend, device):
    # one small compiled step: CBAM, then the loss on its maps; fullgraph=True fails on any graph break
    x, w1, w2, ws = inputs((2, 13, 7, 5, 1, 3), device, layout=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    teacher = [torch.randn(2, 13, generator=g).to(device), torch.randn(2, 1, 7, 5, generator=g).to(device)]

    def step(x, w1, w2, ws):
        y, a_c, a_s = cbam(x, w1, w2, ws, backend)
        return cosine_distill(teacher, [a_c, a_s], 0.5, backend) + y.square().mean()

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, ws)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, g, w in zip(BWD_NAMES, *grads, strict=True):
        assert_close(name, g, w)


@ALL
def test_public_op_names_device_mismatch(backend, device):
    x, w1, w2, ws = inputs((2, 8, 5, 5, 2, 3), device)
    with pytest.raises(ValueError, match=f"ws is on meta but x is on {device}"):
        cbam(x, w1, w2, ws.to("meta"), backend)


# ---------------------------------------------------------------------------------------------------------------
# where every fused backend must agree with the torch one: an empty batch, dtype mismatches, autocast, NaN


@LAYOUT
@FUSED
def test_module_empty_batch_matches_torch(backend, device, layout):
    ref, other = modules(device, backend)
    x = torch.randn(0, 8, 5, 4, device=device).contiguous(memory_format=layout)
    for name, g, w in zip(GRAD_NAMES, run_module(other, x), run_module(ref, x), strict=True):
        assert_close(name, g, w)  # the weight gradients: zeros, as a sum over no samples


@FUSED
def test_module_rejects_empty_spatial_size(backend, device):
    x = torch.randn(2, 6, 0, 3, device=device)
    with pytest.raises(ValueError, match=r"x must have C, H and W > 0, got shape \(2, 6, 0, 3\)"):
        CBAM(6, reduction=3, backend=backend).to(device)(x)


MISMATCHED = {"f64-into-f32": (torch.float64, torch.float32), "bf16-into-f32": (torch.bfloat16, torch.float32)}
MISMATCHED["f32-into-f64"] = (torch.float32, torch.float64)


@pytest.mark.parametrize("xdtype,wdtype", MISMATCHED.values(), ids=list(MISMATCHED))
@FUSED
def test_module_dtype_mismatch_raises_like_torch(backend, device, xdtype, wdtype):
    ref, other = modules(device, backend, dtype=wdtype)
    x = torch.randn(2, 8, 4, 4, dtype=xdtype, device=device)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(ValueError, match=f"x is {xdtype} but w1 is {wdtype}; PyTorch's CBAM raises"):
        other(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@FUSED
def test_module_matching_dtypes_run(backend, device, dtype):
    ref, other = modules(device, backend, dtype=dtype)
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    # torch's module rounds every step to bfloat16 where the fused ops keep their maps in float32
    for name, g, w in zip(GRAD_NAMES[:3], other(x), ref(x), strict=True):
        assert_close(name, g.to(w.dtype), w)


@FUSED
def test_module_under_autocast_casts_as_torch(backend, device):
    # bfloat16 autocast: torch's convolutions take float32 and bfloat16 x with float32 weights, but leave a
    # float64 x alone, which then mismatches the bfloat16 weights; the fused backends follow
    ref, other = modules(device, backend)
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1)).to(device, xdtype)
        with torch.autocast(device, dtype=torch.bfloat16):
            run_module(ref, x)
            got = run_module(other, x)
        assert got[0].dtype == xdtype and got[1].dtype == got[2].dtype == torch.float32
        if xdtype == torch.float32:
            # the fused op keeps its maps and gradients in acc under autocast: the same as without it
            for name, g, w in zip(GRAD_NAMES, got, run_module(other, x), strict=True):
                assert_close(name, g, w)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref(x)
        with pytest.raises(ValueError, match="x is torch.float64 but w1 is torch.float32 under autocast"):
            other(x)


def nan_input(case: str) -> torch.Tensor:
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


@LAYOUT
@pytest.mark.parametrize("case", ["report", "lanes"])
@FUSED
def test_module_nan_positions_match_torch(backend, device, case, layout):
    x = nan_input(case).to(device).contiguous(memory_format=layout)
    ref, other = modules(device, backend, channels=x.shape[1], reduction=2 if case == "report" else 8)
    want, got = run_module(ref, x), run_module(other, x)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert_same_nans(name, g, w)
    if case == "report":
        assert want[0][0].isnan().all() and want[1][0].isnan().all()  # the NaN spreads over sample 0
    assert not got[0][1].isnan().any()  # and no further than its sample


# ---------------------------------------------------------------------------------------------------------------
# the compiled extension's own checks, and the Triton kernels' compilation


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, w1, w2, ws: (x[0], w1, w2, ws), r"x must be \(B,C,H,W\), got shape \(8,5,5\)"),
        (lambda x, w1, w2, ws: (x.int(), w1, w2, ws), "x must be float32, float64, bfloat16 or float16, got Int"),
        (lambda x, w1, w2, ws: (x, w1[:, :3], w2, ws), r"w1 must have shape \(2,8\), got \(2,3\)"),
        (lambda x, w1, w2, ws: (x, w1, w2[:4], ws), r"w2 must have shape \(8,2\), got \(4,2\)"),
        (lambda x, w1, w2, ws: (x, w1, w2, ws[:, :2, :2]), r"ws must be \(2,3,3\) or \(2,7,7\), got \(2,2,2\)"),
        (lambda x, w1, w2, ws: (x, w1, w2, ws.new_zeros(2, 5, 5)), r"ws must be \(2,3,3\) or \(2,7,7\), got \(2,5,5\)"),
        (lambda x, w1, w2, ws: (x, w1, w2, ws[:1]), r"ws must have shape \(2,3,3\), got \(1,3,3\)"),
        (lambda x, w1, w2, ws: (x[:, :, :0], w1, w2, ws), r"x must have C, H and W > 0, got shape \(2,8,0,5\)"),
    ],
    ids=["rank", "dtype", "w1", "w2", "ws-kernel", "ws-5x5", "ws-channels", "empty-H"],
)
@EXT
def test_ext_rejects_bad_input(backend, device, change, message):
    args = change(*inputs((2, 8, 5, 5, 2, 3), device))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.askd.cbam_forward(*args)


@EXT
def test_ext_backward_checks_saved_tensors(backend, device):
    x, w1, w2, ws = inputs((2, 8, 5, 5, 2, 3), device)
    saved = list(torch.ops.askd.cbam_forward(x, w1, w2, ws))
    dy, da_c, da_s = grads_in(x, saved)
    bad = saved[1:]
    bad[3] = bad[3].long()  # idx_c
    with pytest.raises(RuntimeError, match="idx_c must be Int, got Long"):
        torch.ops.askd.cbam_backward(dy, da_c, da_s, x, w1, w2, ws, *bad)
    with pytest.raises(RuntimeError, match=r"dy must have shape \(2,8,5,5\), got \(2,8,5,4\)"):
        torch.ops.askd.cbam_backward(dy[..., :4], da_c, da_s, x, w1, w2, ws, *saved[1:])


@EXT
def test_ext_build_info_names_cuda(backend, device):
    # askd.info and the GPU script read whether askd._C was built with its CUDA kernels from this line
    info = torch.ops.askd.build_info()
    assert re.search(r"CUDA (on|off)", info), info
    if device == "cuda":
        assert "CUDA on" in info


def test_triton_kernels_compile_for_a_gpu(tmp_path):
    assert_kernels_compile_for_a_gpu("askd.kernels.cbam", 6, tmp_path)
