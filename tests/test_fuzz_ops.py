"""Fuzzing the fused ops through their public API: ``askd.ops.cbam.cbam``, ``askd.nn.CBAM`` and
``askd.ops.cosine_distill.cosine_distill``, on every backend that runs here.

Hypothesis draws shapes (B = 0, 1 and more, odd and prime sizes), dtypes (the four float dtypes, and integer, bool
and complex ones that must be refused), layouts (contiguous, channels_last, strided slices, transposes), a NaN or
an infinity, zero rows, and one defect at a time (a wrong shape, rank, dtype or device, a mismatched map list, an
argument that is no tensor). Every case ends in one of two ways, and the test knows which before the call:

- valid input: the result equals the written-out reference of ``askd.ops`` (forward and every gradient, within
  ``op_cases.TOL`` of its dtype, NaN where the reference has NaN and nowhere else);
- a defect: a ValueError (a TypeError for what is no tensor) whose message names the argument that was wrong.

Anything else, another exception type, an error on valid input, or a wrong answer, fails. Each backend is held to
the same reference, so backends cannot differ silently. The strategies and helpers here are shared with
tests/test_fuzz_losses.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from op_cases import NAN, ROOT, TOL, assert_close, backend_params

from askd.nn import CBAM
from askd.numerics import memory_format
from askd.ops.cbam import DtypeMismatch, cbam, cbam_backward_ref, cbam_forward_ref
from askd.ops.cosine_distill import cosine_distill, cosine_distill_ref

INF = float("inf")
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REFUSED = (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)  # what every entry point refuses
SIZES = (1, 2, 3, 5, 7, 8, 13)  # 1, odd and prime sizes
TINY = (1, 2, 3)  # for the Triton interpreter, ~80x slower than eager
BATCHES = (0, 1, 2, 3, 5)
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")
POISONS = (NAN, INF, -INF)
NOT_TENSORS = (None, 1.5, [1.0, 2.0])

# Every test runs on the CPU with the backends that run there; Triton only with its own tiny examples, and a
# visible skip with the resolver's reason where it cannot run.
FAST = backend_params(("torch", "ext"))
TRITON = backend_params(("triton",))


# ---------------------------------------------------------------------------------------------------------------
# strategies shared with tests/test_fuzz_losses.py


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values with the strides of ``layout``: channels_last (4-d x only), a strided slice of a larger tensor,
    the transpose of a contiguous tensor (its last two dims), or contiguous."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided" and x.dim() >= 1:
        wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype, poison: float = 0.15, layout: bool = True):
    """A tensor of ``shape`` and ``dtype``: seeded normal values at a drawn scale, with probability ``poison`` one
    NaN or infinity, in a drawn layout (with ``layout``). Shrinks towards unpoisoned, contiguous, unit scale."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from((1.0, 1e-2, 10.0)))
    if x.numel() and draw(st.integers(0, 99)) >= 100 * (1 - poison):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(POISONS))
    return laid_out(x.to(dtype), draw(st.sampled_from(LAYOUTS)) if layout else "contiguous")


@dataclasses.dataclass
class Case:
    """The arguments of one call and what must come of it: ``error`` None for valid arguments, else the exception
    type(s) and a regex the message must match (it names what was wrong)."""

    args: list
    error: tuple[type | tuple[type, ...], str] | None = None

    def refuse(self, kind: type | tuple[type, ...], pattern: str) -> None:
        self.error = (kind, pattern)


def expect_error(case: Case, call: Callable[[], object]) -> None:
    """``call()`` raises the error ``case`` expects, with a message that matches its pattern."""
    kind, pattern = case.error
    with pytest.raises(kind) as info:
        call()
    assert re.search(pattern, str(info.value)), f"message {str(info.value)!r} does not match {pattern!r}"


def other_dtype(draw, dtype: torch.dtype) -> torch.dtype:
    return draw(st.sampled_from([d for d in FLOATS if d != dtype]))


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with a gradient, of t's values and strides (``clone`` would make a strided slice contiguous)."""
    x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return x.copy_(t.detach()).requires_grad_()


def leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [leaf(t) if t.is_floating_point() else t for t in tensors]


def like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded normal values of t's shape, dtype and device: an upstream gradient."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t.device, t.dtype)


# ---------------------------------------------------------------------------------------------------------------
# CBAM: x (B,C,H,W), w1 (R,C), w2 (C,R), ws (2,k,k)

CBAM_DEFECTS = ("x-dtype", "x-rank", "x-empty", "w-shape", "w-dtype", "w-int", "w-device", "not-tensor")
WEIGHTS = ("w1", "w2", "ws")


def wrong_shape(w: torch.Tensor, name: str) -> torch.Tensor:
    """w with a shape CBAM refuses: one more input channel (w1), one more output channel (w2), a 5x5 kernel (ws)."""
    shape = {"w1": (w.shape[0], w.shape[1] + 1), "w2": (w.shape[0] + 1, w.shape[1]), "ws": (2, 5, 5)}[name]
    return w.new_zeros(shape)


@st.composite
def cbam_cases(draw, sizes=SIZES, batches=BATCHES, defects=CBAM_DEFECTS):
    """A :class:`Case` of ``cbam(x, w1, w2, ws, backend)`` arguments, valid or with one drawn defect."""
    B = draw(st.sampled_from(batches))
    C, H, W = (draw(st.sampled_from(sizes)) for _ in range(3))
    R, k, dtype = draw(st.integers(1, max(1, C // 2))), draw(st.sampled_from((3, 7))), draw(st.sampled_from(FLOATS))
    x = draw(tensors((B, C, H, W), dtype, poison=0.3))
    weights = [draw(tensors(s, torch.float32, poison=0, layout=False)) / s[-1] ** 0.5 for s in ((R, C), (C, R),
                                                                                                    (2, k, k))]
    case = Case([x, *(w.to(dtype) for w in weights)])
    defect = draw(st.one_of(st.none(), st.sampled_from(defects))) if defects else None
    event(f"defect: {defect}")  # --hypothesis-show-statistics counts them
    i = draw(st.integers(1, 3))  # the weight a weight defect hits
    name = WEIGHTS[i - 1]
    if defect == "x-dtype":
        case.args[0] = x.to(draw(st.sampled_from(REFUSED)))
        case.refuse(ValueError, r"\bx must be float32, float64, bfloat16 or float16")
    elif defect == "x-rank":
        case.args[0] = draw(st.sampled_from((x.flatten(0, 1), x[None], x.flatten(2))))
        case.refuse(ValueError, r"\bx must be \(B,C,H,W\)")
    elif defect == "x-empty":
        case.args[0] = draw(st.sampled_from((x[:, :, :0], x[..., :0])))
        case.refuse(ValueError, r"\bx must have C, H and W > 0")
    elif defect == "w-shape":
        case.args[i] = wrong_shape(case.args[i], name)
        case.refuse(ValueError, rf"\b{name} must (have shape|be \(2,3,3\))")
    elif defect == "w-dtype":  # PyTorch's CBAM raises on this mismatch too
        case.args[i] = case.args[i].to(other_dtype(draw, dtype))
        case.refuse(DtypeMismatch, rf"\bx is torch\.\w+ but {name} is torch\.\w+")
    elif defect == "w-int":
        case.args[i] = case.args[i].to(draw(st.sampled_from(REFUSED)))
        case.refuse(ValueError, rf"\b{name} must be floating point")
    elif defect == "w-device":
        case.args[i] = case.args[i].to("meta")
        case.refuse(ValueError, rf"\b{name} is on meta but x is on cpu")
    elif defect == "not-tensor":
        j = draw(st.integers(0, 3))
        case.args[j] = draw(st.sampled_from(NOT_TENSORS))
        case.refuse(TypeError, rf"\b{('x', *WEIGHTS)[j]} must be a tensor")
    return case


def check_cbam(case: Case, backend: str) -> None:
    """``cbam(*case.args, backend)``: the error the case expects, or the forward outputs, their layout and every
    gradient as the contract's references give them for the x the op hands its kernels."""
    if case.error:
        expect_error(case, lambda: cbam(*case.args, backend))
        return
    args = leaves(case.args)
    y, a_c, a_s = cbam(*args, backend)
    x, w1, w2, ws = case.args
    x = x.contiguous(memory_format=memory_format(x))  # NCHW unless x is channels_last
    want = cbam_forward_ref(x, w1, w2, ws)
    for name, got, w in zip(("y", "a_c", "a_s"), (y, a_c, a_s), want[:3], strict=True):
        assert_close(name, got, w)
    assert y.is_contiguous(memory_format=memory_format(x)), f"y strides {y.stride()}, x strides {x.stride()}"
    upstream = [like(t, seed) for seed, t in enumerate((y, a_c, a_s))]
    grads = torch.autograd.grad((y, a_c, a_s), args, upstream)
    wgrads = cbam_backward_ref(upstream[0].contiguous(memory_format=memory_format(x)), *upstream[1:], x, w1, w2, ws,
                               *want[1:])
    for name, got, w in zip(("dx", "dw1", "dw2"), grads[:3], wgrads[:3], strict=True):
        assert_close(name, got, w)
    assert_close_dws(grads[3], wgrads[3])


def assert_close_dws(got: torch.Tensor, want: torch.Tensor) -> None:
    """The spatial conv's weight gradient: as :func:`assert_close`, but where the reference has a NaN a fused kernel
    may have a number. PyTorch's convolution backward (the references') multiplies a NaN or infinite spatial-gate
    gradient by the zero padding for some shapes and not for others (a 1x1 map with k = 3: every tap NaN; a 7x1 map
    with k = 7: only the taps that reach a pixel), while the compiled kernels skip the padding, so a tap reaching a
    NaN only through the padding is a number there. Every NaN of a kernel is the reference's, and both agree
    wherever both are finite."""
    if want.isfinite().all():
        assert_close("dws", got, want)
        return
    assert not (got.isnan() & ~want.isnan()).any(), f"dws: NaN where the reference has none: {got} vs {want}"
    both = got.isfinite() & want.isfinite()
    assert_close("dws (finite taps)", got[both], want[both])


def cbam_case(x, R=1, k=3, **change) -> Case:
    """A valid-looking Case of x and float32 weights for its C (4 where x has none), ``change`` (name -> value)
    applied: the examples below pin cases the fuzzing found."""
    C = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() > 1 else 4
    args = {"x": x, "w1": torch.ones(R, C) / C, "w2": torch.ones(C, R), "ws": torch.ones(2, k, k) / k} | change
    return Case(list(args.values()))


def refused(case: Case, kind: type, pattern: str) -> Case:
    case.refuse(kind, pattern)
    return case


X = torch.ones(2, 4, 3, 3)


@pytest.mark.parametrize("backend,device", FAST)
@settings(max_examples=60)
@given(case=cbam_cases())
# found by the fuzzing: a 0-d ws was an IndexError, an argument that is no tensor an AttributeError, R = 0 a
# message that asked for the shape it got
@example(case=refused(cbam_case(X, ws=torch.tensor(1.0)), ValueError, r"\bws must be \(2,3,3\) or \(2,7,7\), got \(\)"))
@example(case=refused(cbam_case(X, w1=[1.0]), TypeError, r"\bw1 must be a tensor"))
@example(case=refused(cbam_case(None), TypeError, r"\bx must be a tensor"))
@example(case=refused(cbam_case(X, R=0), ValueError, r"\bw1 must have shape \(R,4\) with R >= 1"))
# and where the backward's references spread a NaN further than autograd and the kernels: through the channel MLP's
# ReLU (a product with its mask, 0 * NaN) and the max pools' one-hot masks; dx[2] is a number
@example(case=cbam_case(torch.tensor([[[[-INF, 0.2669, 0.0617]]]])))
# and a NaN that the spatial conv's weight gradient meets only in the padding (see assert_close_dws)
@example(case=cbam_case(torch.full((1, 1, 1, 1), NAN)))
def test_cbam_op(backend, device, case):
    check_cbam(case, backend)


@pytest.mark.parametrize("backend,device", TRITON)
@settings(max_examples=12)
@given(case=cbam_cases(sizes=TINY, batches=(0, 1, 2), defects=()))  # the refusals come before any backend runs
def test_cbam_op_triton(backend, device, case):
    check_cbam(case, backend)


# ---------------------------------------------------------------------------------------------------------------
# the module: askd.nn.CBAM(C) with backend torch against the same module through a fused backend

MODULE_DEFECTS = ("channels", "x-rank", "x-dtype", "x-empty", "dtype-mismatch", "not-tensor")


@st.composite
def module_cases(draw):
    """A Case ``[x, C, module dtype, spatial kernel, maps]`` of ``CBAM(C)``'s input, valid or with one defect.

    Both modules give the same errors: x of another float dtype than the weights is a DtypeMismatch (a ValueError,
    and a RuntimeError as PyTorch's own) in the torch module too, also in an empty batch, which PyTorch lets
    through."""
    B, C, H, W = (draw(st.sampled_from(s)) for s in (BATCHES, SIZES, SIZES, SIZES))
    dtype = draw(st.sampled_from(FLOATS))
    x = draw(tensors((B, C, H, W), dtype, poison=0.3))
    case = Case([x, C, dtype, draw(st.sampled_from((3, 7))), draw(st.sampled_from(("logits", "sigmoid")))])
    defect = draw(st.one_of(st.none(), st.sampled_from(MODULE_DEFECTS)))
    event(f"defect: {defect}")  # --hypothesis-show-statistics counts them
    if defect == "channels":
        case.args[0] = torch.cat([x, x[:, :1]], dim=1)
        case.refuse(ValueError, rf"CBAM\({C}\) expects x of shape \(B,{C},H,W\)")
    elif defect == "x-rank":
        case.args[0] = x.flatten(0, 1)
        case.refuse(ValueError, rf"CBAM\({C}\): x must be \(B,C,H,W\)")
    elif defect == "x-dtype":
        case.args[0] = x.to(draw(st.sampled_from(REFUSED)))
        case.refuse(ValueError, rf"CBAM\({C}\): x must be float32")
    elif defect == "x-empty":
        case.args[0] = x[..., :0]
        case.refuse(ValueError, rf"CBAM\({C}\): x must have C, H and W > 0")
    elif defect == "dtype-mismatch":
        case.args[0] = x.to(other_dtype(draw, dtype))
        case.refuse(DtypeMismatch, rf"CBAM\({C}\): x is torch\.\w+ but w1 is torch\.\w+")
    elif defect == "not-tensor":
        case.args[0] = draw(st.sampled_from(NOT_TENSORS))
        case.refuse(TypeError, rf"CBAM\({C}\): x must be a tensor")
    return case


def module_outputs(module: CBAM, x: torch.Tensor) -> list[torch.Tensor]:
    """The module's (y, channel map, spatial map) on x and the gradients of x and of its weights for seeded
    upstream gradients of all three."""
    (x,) = leaves([x])
    outputs = module(x)
    upstream = [like(t, seed) for seed, t in enumerate(outputs)]
    return [*outputs, *torch.autograd.grad(outputs, [x, *module.parameters()], upstream)]


@pytest.mark.parametrize("backend,device", backend_params(("ext",)))
@settings(max_examples=40)
@given(case=module_cases())
# found by the fuzzing: float64 x into a float32 module in an empty batch ran in the torch module (PyTorch checks no
# dtypes there) and raised in the fused one
@example(case=refused(Case([X[:0].double(), 4, torch.float32, 3, "logits"]), DtypeMismatch,
                      r"CBAM\(4\): x is torch.float64 but w1 is torch.float32"))
def test_cbam_module_matches_torch_module(backend, device, case):
    x, channels, dtype, k, maps = case.args
    torch.manual_seed(0)
    ref = CBAM(channels, reduction=2, spatial_kernel=k, maps=maps, backend="torch").to(dtype)
    fused = CBAM(channels, reduction=2, spatial_kernel=k, maps=maps, backend=backend).to(dtype)
    fused.load_state_dict(ref.state_dict())
    if case.error:
        expect_error(case, lambda: fused(x))
        expect_error(case, lambda: ref(x))
        return
    got, want = module_outputs(fused, x), module_outputs(ref, x)
    names = ("y", "channel map", "spatial map", "dx", "dw1", "dw2", "dws")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, name
    # in low precision the torch module rounds every step to x's dtype where the fused op keeps float32 (the
    # functional fuzzing above compares those against the contract)
    if dtype in (torch.float32, torch.float64):
        for name, g, w in zip(names[:-1], got[:-1], want[:-1], strict=True):
            assert_close(name, g, w)
        assert_close_dws(got[-1], want[-1])


# ---------------------------------------------------------------------------------------------------------------
# the loss: cosine_distill(teacher maps, student maps, weight, backend)

MAP_DEFECTS = ("count", "empty", "shape", "batch", "map-int", "map-rank", "map-device", "not-tensor")


@st.composite
def map_shapes(draw, sizes=SIZES) -> tuple[int, ...]:
    """A map's shape after its batch dim: a channel map (C,), a spatial map (1,H,W) or any (D1,D2)."""
    size = st.sampled_from(sizes)
    return draw(st.sampled_from(((draw(size),), (1, draw(size), draw(size)), (draw(size), draw(size)))))


@st.composite
def map_lists(draw, sizes=SIZES, batches=BATCHES, max_maps=4, defects=MAP_DEFECTS):
    """A Case ``[teacher maps, student maps, weight, upstream gradient]``, valid or with one drawn defect.

    Teacher and student map j share a shape (B, ...); most share one dtype, some differ (the op promotes them all
    to one). A map may hold a NaN or an infinity, or a zero row (the cosine's eps branch). B = 0 is refused: the
    loss is a mean over the batch."""
    B, M, base = draw(st.sampled_from(batches)), draw(st.integers(1, max_maps)), draw(st.sampled_from(FLOATS))
    dtype = st.one_of(st.just(base), st.sampled_from(FLOATS))
    teacher, student = [], []
    for _ in range(M):
        shape = (B, *draw(map_shapes(sizes)))
        teacher.append(draw(tensors(shape, draw(dtype))))
        student.append(draw(tensors(shape, draw(dtype))))
    if B and draw(st.booleans()):
        maps, j = draw(st.sampled_from((teacher, student))), draw(st.integers(0, M - 1))
        maps[j][draw(st.integers(0, B - 1))] = 0  # drawn for this case alone: in place keeps its layout
    case = Case([teacher, student, draw(st.sampled_from((5.0, 0.7, -1.0, 0.0))), draw(st.sampled_from((1.0, -2.5)))])
    defect = draw(st.one_of(st.none(), st.sampled_from(defects))) if defects else None
    event(f"defect: {defect}")  # --hypothesis-show-statistics counts them
    j = draw(st.integers(0, M - 1))  # the map a map defect hits
    if B == 0:
        case.refuse(ValueError, "the distillation loss needs at least one sample, got batch size 0")
    elif defect in ("count", "empty"):
        cut = M - 1 if defect == "count" else 0
        case.args[:2] = teacher[:cut], student[: M if defect == "count" else 0]
        case.refuse(ValueError, rf"as many teacher as student maps \(> 0\), got {cut} and {len(case.args[1])}")
    elif defect == "shape":
        student[j] = torch.cat([student[j], student[j][:, :1]], dim=1)
        case.refuse(ValueError, rf"map {j}: teacher shape \(.*\) != student shape")
    elif defect == "batch":
        teacher.append(torch.ones(B + 1, 3))
        student.append(torch.ones(B + 1, 3))
        case.refuse(ValueError, rf"map {M}: expected shape \(B={B}, ...\), got \({B + 1}, 3\)")
    elif defect == "map-int":
        teacher[j], student[j] = (m.to(draw(st.sampled_from(REFUSED))) for m in (teacher[j], student[j]))
        case.refuse(ValueError, rf"map {j}: maps must be floating point")
    elif defect == "map-rank":
        teacher[j], student[j] = (draw(st.sampled_from((m[:, 0].flatten(), m[0, 0].flatten()[0]))) for m in
                                  (teacher[j], student[j]))
        case.refuse(ValueError, rf"map {j}: expected shape \(B, ...\) with at least 2 dims")
    elif defect == "map-device":
        teacher[j] = teacher[j].to("meta")
        case.refuse(ValueError, rf"map {j}: teacher on meta, student on cpu")
    elif defect == "not-tensor":
        draw(st.sampled_from((teacher, student)))[j] = draw(st.sampled_from(NOT_TENSORS))
        case.refuse(TypeError, rf"map {j}: maps must be tensors")
    return case


def check_cosine_distill(case: Case, backend: str) -> None:
    """``cosine_distill(teacher, student, weight, backend)``: the error the case expects, or the loss and every
    student gradient (for the case's upstream gradient) as the formula gives them for the maps cast to one dtype
    (:func:`assert_close_to_truth`: the formula in float64 is the truth, the formula in that dtype the yardstick)."""
    teacher, student, weight, upstream = case.args
    if case.error:
        expect_error(case, lambda: cosine_distill(teacher, student, weight, backend))
        return
    dtype = functools.reduce(torch.promote_types, [m.dtype for m in (*teacher, *student)])

    def loss_and_grads(fn, student=student):
        maps = leaves(student)
        loss = fn(maps)
        return [loss, *torch.autograd.grad(upstream * loss, maps)]

    got = loss_and_grads(lambda s: cosine_distill(teacher, s, weight, backend))
    want = loss_and_grads(lambda s: cosine_distill_ref([t.to(dtype) for t in teacher], [m.to(dtype) for m in s],
                                                       weight))
    truth = loss_and_grads(lambda s: cosine_distill_ref([t.double() for t in teacher], s, weight),
                           [m.double() for m in student])
    sizes = [torch.ones(())] + [term_size(s, weight * upstream) for s in student]
    for i, (g, w, t, size) in enumerate(zip(got, want, truth, sizes, strict=True)):
        assert_close_to_truth("loss" if i == 0 else f"d student map {i - 1}", g, w, t, size)


def term_size(s: torch.Tensor, scale: float) -> torch.Tensor:
    """How large the terms of d loss / d s are, per row of student map s (B, ...): t / n and dot * s / (n |s|^2) are
    each about scale / (B |s|); they cancel where t and s are nearly parallel, so a float32 gradient is that size
    times float32's rounding off the truth, however small the gradient itself. 0 for a zero row (no such terms)."""
    norm = s.detach().double().flatten(1).norm(dim=1)
    size = torch.where(norm > 0, abs(scale) / s.shape[0] / norm, 0.0)
    return size.reshape(-1, *[1] * (s.dim() - 1))


def assert_close_to_truth(name: str, got: torch.Tensor, want: torch.Tensor, truth: torch.Tensor,
                          size: torch.Tensor) -> None:
    """got is no further from ``truth`` (float64) than ``want`` (the reference in got's dtype) is, give or take
    ``op_cases.TOL`` of that dtype relative to ``size`` (how large the terms that make each element are; the result
    itself, where larger); NaN and infinities exactly where want has them.

    Plain closeness to want is not the rule here: where terms cancel (1 - cos of nearly parallel maps, the
    gradient's two terms), the reference's own float32 rounding may be the larger error, and a kernel that rounds
    less is as right as it is."""
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), name
    special = ~want.isfinite()
    torch.testing.assert_close(got[special], want[special], equal_nan=True, msg=lambda m: f"{name}: {m}")
    rtol, atol = TOL[want.dtype]
    size = torch.maximum(size.expand(got.shape), torch.tensor(max(truth.nan_to_num(0, 0, 0).abs().max().item(), 1.0)))
    g, w, t, size = (v[~special].double() for v in (got, want, truth, size))
    excess = (g - t).abs() - (w - t).abs() - atol * size - rtol * t.abs()
    assert not (excess > 0).any(), f"{name}: {got} is further from {truth} than {want} is, beyond {(rtol, atol)}"


# found by the fuzzing: with a small |s|, n |s|^2 < eps while n = |t| |s| > eps, where the torch backend's backward,
# Triton's and CUDA's clamped n |s|^2 at eps: a gradient of 245 for a true 0 (row 1: one value, cos = 1 whatever s)
SMALL_S = Case([[torch.tensor([[1.5410], [-0.2934]])], [torch.tensor([[0.0154], [-0.0029]])], 5.0, 1.0])


@pytest.mark.parametrize("backend,device", FAST)
@settings(max_examples=60)
@given(case=map_lists())
@example(case=SMALL_S)
# and: a map that is no tensor was an AttributeError, a 0-d map a message of batch size None
@example(case=refused(Case([[None], [torch.ones(2, 3)], 5.0, 1.0]), TypeError, r"map 0: maps must be tensors"))
@example(case=refused(Case([[torch.tensor(1.0)], [torch.tensor(1.0)], 5.0, 1.0]), ValueError,
                      r"map 0: expected shape \(B, ...\) with at least 2 dims, got \(\)"))
def test_cosine_distill_op(backend, device, case):
    check_cosine_distill(case, backend)


@pytest.mark.parametrize("backend,device", TRITON)
@settings(max_examples=12)
@given(case=map_lists(sizes=TINY, batches=(0, 1, 2), max_maps=2, defects=()))
@example(case=SMALL_S)
def test_cosine_distill_op_triton(backend, device, case):
    check_cosine_distill(case, backend)


# ---------------------------------------------------------------------------------------------------------------
# the compiled ops themselves, in a subprocess: a native crash there would take pytest down with it

# found by fuzzing the registered op torch.ops.askd.cbam_backward with perturbed saved tensors: argmaxes out of range
# (saved tensors that are not the forward's) made the CPU kernel write outside its buffers, a heap corruption (abort
# or segfault). Each case prints the error it got.
RAW_BACKWARD = """
import torch
import askd.ops
from askd.ops.cbam import cbam_forward_ref

x, w1, w2, ws = torch.randn(2, 8, 5, 3), torch.randn(2, 8), torch.randn(8, 2), torch.randn(2, 3, 3)
saved = list(cbam_forward_ref(x, w1, w2, ws)[1:])
grads = [torch.randn(2, 8, 5, 3), torch.randn(2, 8), torch.randn(2, 1, 5, 3)]
for i, value in ((3, 10**6), (3, -5), (5, 8), (5, -1), (3, 15)):  # idx_c indexes H*W = 15, idx_s C = 8
    bad = [t.clone() for t in saved]
    bad[i].view(-1)[-1] = value
    try:
        torch.ops.askd.cbam_backward(*grads, x, w1, w2, ws, *bad)
        print("no error")
    except RuntimeError as err:
        print(str(err).splitlines()[0])
"""


@pytest.mark.parametrize("backend,device", backend_params(("ext",)))
def test_compiled_backward_refuses_argmaxes_out_of_range(backend, device):
    done = subprocess.run([sys.executable, "-c", RAW_BACKWARD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stdout
    pattern = r"askd::cbam_backward: idx_[cs] must lie in \[0, (H\*W=15|C=8)\), got -?\d+\.\.\d+"
    assert all(re.search(pattern, line) for line in lines), done.stdout
