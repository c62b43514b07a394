"""PReLU's one-pass backward (:mod:`askd.ops.prelu`, ``torch.ops.askd.prelu_backward``) and the module
:class:`askd.nn.prelu.PReLU` against aten's ``nn.PReLU`` and the written-out reference.

The contract on both backends (ext, torch): dx and dw against the reference in float64 (float32 tight, bfloat16 and
float16 within one rounding step, :data:`TOL`), NCHW and channels_last, odd shapes (C = 1, 3, 13; H = W = 1, 5),
B = 1, IR-50's stage shapes at B = 1, several channels_last tasks with a remainder, an empty batch. The module
against nn.PReLU: y and dx bit for bit, dw within TOL, non-contiguous input, x exactly 0 (the slope, as aten), a
NaN x and an infinite or NaN upstream gradient, autocast, B = 1; fp64 gradcheck, dw the same for 1 and 2 threads,
the state_dict both ways and the IR-ResNet keys, the fallbacks (backend torch, no kernel), ``torch.library.opcheck``,
the compiled op's error messages and one small ``torch.compile(fullgraph=True)``. Cases needing the compiled kernel
skip with the reason where ``askd._C`` lacks it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from askd import _ext
from askd.nn.prelu import PReLU
from askd.numerics import memory_format
from askd.ops import prelu as prelu_ops
from askd.ops.prelu import backend_impl, prelu, prelu_backward_ref, prelu_ref

NO_EXT = (
    f"askd._C is not importable ({_ext.error()}); {_ext.HINT}"
    if _ext.load() is None
    else f"askd._C has no CPU prelu_backward kernel (an older build); {_ext.HINT}"
)
NEEDS_EXT = pytest.mark.skipif("cpu" not in prelu_ops.EXT_DEVICES, reason=NO_EXT)
BACKENDS = pytest.mark.parametrize("backend", [pytest.param("ext", marks=NEEDS_EXT), "torch"])
LAYOUTS = pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
# (rtol, atol) for dw against the float64 reference, atol relative to max |dw| (at least 1): float32 differs by
# summation order only, the low-precision dtypes by the final cast (bf16 keeps 8 bits: 2^-8 relative rounding)
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6), torch.bfloat16: (8e-3, 8e-3),
       torch.float16: (1e-3, 1e-3)}  # fmt: skip
# (B, C, H, W): B = 1, odd and prime sizes, C = 1, 1x1 maps, and with C = 64 and 512 several channels_last tasks
# (16384 values each) with a remainder
SHAPES = [(1, 3, 5, 5), (2, 3, 5, 5), (3, 13, 7, 5), (2, 1, 4, 6), (4, 5, 1, 1), (2, 64, 28, 28), (2, 512, 7, 7)]
IR50 = [(1, 64, 112, 112), (1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7)]


def inputs(shape, dtype=torch.float32, layout=torch.contiguous_format, seed=0):
    """x with exact zeros among its values, upstream gradient g, weight (C,) with slopes of both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[x.abs() < 0.1] = 0.0
    grad = torch.randn(shape, generator=g)
    w = torch.rand(shape[1], generator=g) - 0.25
    x, grad = (t.to(dtype).contiguous(memory_format=layout) for t in (x, grad))
    return x, grad, w.to(dtype)


def reference(grad, x, w):
    """The contract in float64 from the same (rounded) inputs, cast back as the backends return it."""
    dx, dw = prelu_backward_ref(grad.double(), x.double(), w.double())
    return dx.to(x.dtype), dw.to(w.dtype)


def assert_dw(got, want):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    rtol, atol = TOL[want.dtype]
    scale = max(want.double().abs().nan_to_num(0).max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, equal_nan=True)


def module_pair(C, dtype=torch.float32, backend="ext", seed=1):
    """nn.PReLU and PReLU(backend) with the same slopes, of both signs."""
    ref = nn.PReLU(C, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C, generator=torch.Generator().manual_seed(seed)) - 0.25)
    ours = PReLU(C, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(module, x, grad):
    """module(x), dx and dw for upstream ``grad``."""
    module.zero_grad()
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y, x.grad, module.weight.grad


@BACKENDS
@LAYOUTS
@pytest.mark.parametrize("dtype", TOL, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_contract(backend, layout, dtype, shape):
    x, grad, w = inputs(shape, dtype, layout)
    dx, dw = backend_impl(backend).backward(grad, x, w)
    want_dx, want_dw = reference(grad, x, w)
    # dx is g or one product w * g, rounded once: exact in every dtype
    assert torch.equal(dx, want_dx) and dx.dtype == x.dtype
    assert memory_format(dx) == memory_format(x) and dx.is_contiguous(memory_format=memory_format(x))
    assert_dw(dw, want_dw)


@NEEDS_EXT
@LAYOUTS
@pytest.mark.parametrize("shape", IR50, ids=str)
def test_ir50_shapes_against_aten(layout, shape):
    ref, ours = module_pair(shape[1])
    x, grad, _ = inputs(shape, layout=layout)
    y_ref, dx_ref, dw_ref = run(ref, x, grad)
    y, dx, dw = run(ours, x, grad)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert dx.stride() == dx_ref.stride()
    assert_dw(dw, reference(grad, x, ours.weight.detach())[1])


@NEEDS_EXT
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced", "permuted", "grad_other_layout"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (3, 13, 7, 5), (2, 64, 9, 9)], ids=str)
def test_module_against_nn_prelu(layout, shape):
    ref, ours = module_pair(shape[1])
    x, grad, _ = inputs(shape, layout=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    if layout == "sliced":  # neither NCHW nor channels_last: every other column of a wider map
        x, grad = (torch.cat([t, t], dim=3)[..., ::2] for t in (x, grad))
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # (B,C,W,H) strides read as (B,C,H,W)
        x, grad = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, grad))
    elif layout == "grad_other_layout":  # x channels_last, the upstream gradient NCHW
        x = x.contiguous(memory_format=torch.channels_last)
    y_ref, dx_ref, dw_ref = run(ref, x, grad)
    y, dx, dw = run(ours, x, grad)
    assert "PReLU" in type(y.grad_fn).__name__ and type(y.grad_fn) is not type(y_ref.grad_fn)  # ours ran
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert_dw(dw, reference(grad, x, ours.weight.detach())[1])
    assert_dw(dw, dw_ref)


@NEEDS_EXT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_module_low_precision(dtype):
    # aten rounds each g * x to the dtype before its sum; ours accumulates in float32 and rounds once: both within
    # TOL of the float64 reference, dx and y bit for bit
    ref, ours = module_pair(13, dtype)
    x, grad, _ = inputs((3, 13, 7, 5), dtype, torch.channels_last)
    y_ref, dx_ref, dw_ref = run(ref, x, grad)
    y, dx, dw = run(ours, x, grad)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and dw.dtype == dtype
    want = reference(grad, x, ours.weight.detach())[1]
    assert_dw(dw, want)
    assert_dw(dw_ref, want)


@NEEDS_EXT
def test_module_under_autocast():
    # autocast casts prelu's x and weight to bfloat16 and leaves float64 alone: ours does the same
    ref, ours = module_pair(13)
    x, grad, _ = inputs((2, 13, 7, 5), layout=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, dx_ref, dw_ref = run(ref, x, grad.bfloat16())
        y, dx, dw = run(ours, x, grad.bfloat16())
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    w16 = ours.weight.detach().bfloat16()
    assert_dw(dw.bfloat16(), reference(grad.bfloat16(), x.bfloat16(), w16)[1])
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="Type promoting"):
        ours(x.double().requires_grad_())  # float64 x, bfloat16 weight: aten's own error


@NEEDS_EXT
def test_zero_and_nan_follow_aten():
    # at x == 0 (and -0) aten takes the slope for dx and adds 0 * g to dw; a NaN x takes the slope too, dw NaN
    ref, ours = module_pair(2)
    x = torch.tensor([[[[-1.0, 0.0, -0.0, 2.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    grad = torch.tensor([[[[1.0, 3.0, 5.0, 7.0]], [[2.0, -2.0, 4.0, 1.0]]]])
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, gl = x.contiguous(memory_format=layout), grad.contiguous(memory_format=layout)
        y_ref, dx_ref, dw_ref = run(ref, xl, gl)
        y, dx, dw = run(ours, xl, gl)
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
        assert torch.equal(dx[0, 1], ours.weight[1].detach() * grad[0, 1])  # every x == 0: the slope
        assert dw[1] == 0
    x[0, 0, 0, 1] = float("nan")
    y_ref, dx_ref, dw_ref = run(ref, x, grad)
    y, dx, dw = run(ours, x, grad)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(dx, dx_ref)
    assert dw[0].isnan() and dw_ref[0].isnan() and torch.equal(dw[1], dw_ref[1])
    # an infinite or NaN upstream gradient where x > 0 passes to dx and adds nothing to dw (not inf * 0 = NaN)
    x[0, 0, 0, 1] = 0.0
    grad[0, 0, 0, 3], grad[0, 1, 0, 0] = float("inf"), float("nan")
    x[0, 1, 0, 0] = 1.0
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, gl = x.contiguous(memory_format=layout), grad.contiguous(memory_format=layout)
        y_ref, dx_ref, dw_ref = run(ref, xl, gl)
        y, dx, dw = run(ours, xl, gl)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0, equal_nan=True)
        assert dw.isfinite().all() and torch.equal(dw, dw_ref)


@NEEDS_EXT
def test_double_backward_raises():
    # the compiled backward has no gradient itself: a second derivative is refused rather than silently wrong
    _, ours = module_pair(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (dx,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


@NEEDS_EXT
def test_empty_batch():
    ref, ours = module_pair(3)
    x, grad, _ = inputs((0, 3, 5, 5), layout=torch.channels_last)
    y, dx, dw = run(ours, x, grad)
    assert y.shape == dx.shape == (0, 3, 5, 5) and torch.equal(dw, torch.zeros(3))


@BACKENDS
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gradcheck_float64(backend, layout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).contiguous(memory_format=layout)  # away from the kink at 0
    w = torch.rand(3, generator=g, dtype=torch.float64) - 0.25
    assert torch.autograd.gradcheck(lambda x, w: prelu(x, w, backend), (x.requires_grad_(), w.requires_grad_()))


@NEEDS_EXT
def test_dw_independent_of_thread_count():
    x, grad, w = inputs((4, 64, 28, 28), layout=torch.channels_last)
    xn, gn = x.contiguous(), grad.contiguous()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [torch.ops.askd.prelu_backward(g, x, w) for g, x in ((grad, x), (gn, xn))]
        torch.set_num_threads(2)
        two = [torch.ops.askd.prelu_backward(g, x, w) for g, x in ((grad, x), (gn, xn))]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_state_dict_round_trip():
    ref = nn.PReLU(7)
    with torch.no_grad():
        ref.weight.uniform_(-1, 1)
    ours = PReLU(7, backend="auto")
    ours.load_state_dict(ref.state_dict())  # strict: the same keys and shapes
    back = nn.PReLU(7)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight"] and torch.equal(back.weight, ref.weight)
    assert isinstance(ours, nn.PReLU)


def test_iresnet_uses_it_with_the_same_keys():
    from askd import models

    model = models.create("ir_tiny_cbam", backend="torch")
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert prelus and all(type(m) is PReLU and m.backend == "torch" for m in prelus)
    keys = model.state_dict().keys()
    assert "stem.2.weight" in keys and "blocks.0.res.3.weight" in keys


@pytest.mark.parametrize("backend", ["torch", None])
def test_torch_backend_is_nn_prelu(backend, monkeypatch):
    # backends torch (and the default without $ASKD_BACKEND) run aten's prelu and its autograd, unchanged
    monkeypatch.delenv("ASKD_BACKEND", raising=False)
    ref, ours = module_pair(3, backend=backend)
    x, grad, _ = inputs((2, 3, 5, 5))
    y_ref, dx_ref, dw_ref = run(ref, x, grad)
    y, dx, dw = run(ours, x, grad)
    assert type(y.grad_fn) is type(y_ref.grad_fn)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)


def test_without_the_kernel_falls_back_to_aten(monkeypatch):
    # ext on a device without a prelu kernel (a GPU, an older build) runs nn.PReLU: CBAM's ext may still run
    monkeypatch.setattr(prelu_ops, "EXT_DEVICES", frozenset())
    monkeypatch.setattr("askd.backend.resolve_constant", lambda requested, device_type: "ext")
    ref, ours = module_pair(3)
    x, grad, _ = inputs((2, 3, 5, 5))
    y, dx, dw = run(ours, x, grad)
    assert type(y.grad_fn) is type(run(ref, x, grad)[0].grad_fn)


@NEEDS_EXT
def test_no_grad_and_other_shapes_run_aten():
    _, ours = module_pair(3)
    x, _, _ = inputs((2, 3, 5, 5))
    with torch.no_grad():
        assert torch.equal(ours(x), F.prelu(x, ours.weight))
    ours.weight.requires_grad_(False)
    assert ours(x).grad_fn is None
    ours.weight.requires_grad_(True)
    x3 = torch.randn(2, 3, 5, requires_grad=True)  # 3-D input: aten
    assert "PreluKernel" in type(ours(x3).grad_fn).__name__


def test_reference_is_the_formula():
    x, grad, w = inputs((2, 3, 5, 5), torch.float64)
    y = prelu_ref(x, w)
    wb = w[:, None, None]
    torch.testing.assert_close(y, x.clamp(min=0) + wb * x.clamp(max=0), rtol=0, atol=0)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    F.prelu(xr, wr).backward(grad)
    dx, dw = prelu_backward_ref(grad, x, w)
    assert torch.equal(dx, xr.grad)
    torch.testing.assert_close(dw, (grad * x.clamp(max=0)).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-12, atol=1e-12)


@NEEDS_EXT
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_opcheck(layout):
    x, grad, w = inputs((2, 6, 5, 4), layout=layout)
    torch.library.opcheck(torch.ops.askd.prelu_backward.default, (grad, x, w))


@NEEDS_EXT
def test_ext_error_messages():
    x, grad, w = inputs((2, 3, 5, 5))
    op = torch.ops.askd.prelu_backward
    with pytest.raises(RuntimeError, match=r"weight must have shape \(3\), got \(4\)"):
        op(grad, x, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"grad must have shape \(2,3,5,5\)"):
        op(grad[:1], x, w)
    with pytest.raises(RuntimeError, match="weight must be Double, got Float"):
        op(grad.double(), x.double(), w)
    with pytest.raises(RuntimeError, match=r"x must be \(B,C,H,W\) with C > 0"):
        op(grad[0], x[0], w)
    with pytest.raises(RuntimeError, match="x must be float32"):
        op(grad.long(), x.long(), w.long())
    with pytest.raises(ValueError, match="need x"):
        prelu(x[0], w)


@NEEDS_EXT
def test_compile_fullgraph():
    # one tiny compiled step: aten's forward and the compiled backward in one graph, no graph break
    torch._dynamo.reset()
    _, ours = module_pair(3)
    x, grad, _ = inputs((2, 3, 5, 5), layout=torch.channels_last)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    y, dx, dw = run(compiled, x, grad)
    y_e, dx_e, dw_e = run(ours, x, grad)
    assert torch.equal(y, y_e) and torch.equal(dx, dx_e) and torch.equal(dw, dw_e)
