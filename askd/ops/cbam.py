"""Fused CBAM: the contract every fused backend implements, its written-out reference, and the registered op.

Shapes: x (B,C,H,W) (NCHW or channels_last), w1 (R,C) and w2 (C,R) the channel MLP, ws (2,k,k) the
spatial conv (k = 3 or 7). ``acc`` is float64 for float64 x, else float32: the dtype every backend
accumulates in and returns the maps in. g_c = sigmoid(a_c), g_s = sigmoid(a_s).

Forward (``cbam_forward_ref``), returning what backward needs instead of the channel-refined map::

    chan[b,0,c] = mean_p x[b,c,p]          chan[b,1,c] = max_p x[b,c,p]      idx_c = argmax_p   (p = h*W + w)
    a_c         = w2 @ (relu(w1 @ chan[b,0]) + relu(w1 @ chan[b,1]))                            (B,C)
    xc          = x * g_c                                                  (never stored by a fused kernel)
    pooled[b,0,p] = mean_c xc[b,c,p]       pooled[b,1,p] = max_c xc[b,c,p]  idx_s = argmax_c
    a_s         = conv_k(pooled, ws), zero padding k//2                                    (B,1,H,W)
    y           = xc * g_s                                                 x.dtype, x's memory format

    -> y, a_c, a_s, chan (B,2,C), idx_c (B,C) int32, pooled (B,2,H,W), idx_s (B,H,W) int32

Argmaxes take the first index on ties, as ``torch.max(dim)`` does, and like it every max-pool ranks NaN above
every number (the max is NaN, the argmax its first NaN), so a NaN in x spreads as in PyTorch. B may be 0: every
output is then empty and the weight gradients are zero, with no kernel launched. Backward
(``cbam_backward_ref``), given dy, da_c, da_s (the gradients of y and of both maps)::

    dg_s[b,p]  = sum_c dy * x * g_c                           reduce over C
    ga_s       = da_s + dg_s * g_s * (1 - g_s);   dpooled, dws = conv_k backward of ga_s
    dxc        = dy * g_s + dpooled[:,0] / C + [c == idx_s] * dpooled[:,1]
    dg_c[b,c]  = sum_p dxc * x                                reduce over H*W
    ga_c       = da_c + dg_c * g_c * (1 - g_c);   dchan, dw1, dw2 = MLP backward of ga_c
    dx         = dxc * g_c + dchan[:,0] / (H*W) + [p == idx_c] * dchan[:,1]

    -> dx (like x), dw1, dw2, dws (each in its weight's dtype)

Two registrations, one pattern (the same as :mod:`askd.ops.cosine_distill`): autograd is a plain
``torch.autograd.Function``. ``ext`` calls the compiled ops ``torch.ops.askd.cbam_forward`` /
``cbam_backward`` directly (registered in C++ with the fake kernels below, so torch.compile traces them);
the Python backends (``triton``: :mod:`askd.kernels.cbam`; ``torch``: the references here, for testing the
glue) run inside the custom ops ``askd::fused_cbam`` / ``askd::fused_cbam_backward`` so that torch.compile
sees one opaque node. Wrapping the compiled op in a second, Python custom op with ``register_autograd`` (as
this module did before) bought nothing, the compiled op has its schema and fakes already, and measured
slower: a CBAM forward + backward through ``ext`` took 1.25-1.32 ms nested against 0.82-0.86 ms now at
B=1, C=8, 4x4, and 2.34-2.46 ms against 1.87-1.94 ms at B=8, C=64, 14x14 (2-core AMD EPYC, Zen 4,
OMP_NUM_THREADS=1, best of 15 x 200 calls, three alternating runs each).
:func:`cbam_ref` is the formula itself, differentiable by autograd: ``askd.nn.CBAM(backend="torch")`` runs
it, and the tests check every backend against it.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..numerics import acc_dtype, autocast_dtype, cbam_mlp, cbam_mlp_backward, memory_format
from . import dispatch
from .dispatch import compiled_ops

Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def cbam_ref(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The CBAM formula in plain PyTorch at x's dtype: (y, a_c (B,C), a_s (B,1,H,W)), differentiable by autograd.

    x (B,C,H,W), w1 (R,C), w2 (C,R), ws (2,k,k). The MLP runs as 1x1 convolutions on each pooled vector, the
    computation of the ``nn.Conv2d`` layers :class:`askd.nn.CBAM` ran before it called this: in float32 the
    outputs and gradients are the same bit for bit. Under autocast the two MLP passes now cast the weights
    each (views are not in autocast's cache), so their weight gradients add up in float32 where the cached
    low-precision cast added them in bfloat16 / float16: closer to the fused backends, not bitwise the old.
    """
    avg = x.mean(dim=(2, 3), keepdim=True)
    # max with indices (not amax) so the gradient goes to one element, as in the authors' pooling
    mx = x.flatten(2).max(dim=2).values[..., None, None]
    w1, w2 = w1[:, :, None, None], w2[:, :, None, None]

    def mlp(v: Tensor) -> Tensor:
        return F.conv2d(F.relu(F.conv2d(v, w1)), w2)

    a_c = mlp(avg) + mlp(mx)  # (B,C,1,1)
    xc = x * torch.sigmoid(a_c)
    pooled = torch.cat([xc.mean(dim=1, keepdim=True), xc.max(dim=1, keepdim=True).values], dim=1)
    a_s = F.conv2d(pooled, ws[None], padding=ws.shape[-1] // 2)  # (B,1,H,W)
    return xc * torch.sigmoid(a_s), a_c.flatten(1), a_s


def cbam_forward_ref(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> Outputs:
    """The forward contract, written out in PyTorch (see the module docstring)."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    flat = xf.flatten(2)
    cmax, idx_c = flat.max(dim=2)
    chan = torch.stack([flat.mean(dim=2), cmax], dim=1)
    a_c, _ = cbam_mlp(chan, w1.to(acc), w2.to(acc))
    xc = xf * torch.sigmoid(a_c)[:, :, None, None]
    smax, idx_s = xc.max(dim=1)
    pooled = torch.stack([xc.mean(dim=1), smax], dim=1)
    a_s = F.conv2d(pooled, ws.to(acc)[None], padding=ws.shape[-1] // 2)
    y = (xc * torch.sigmoid(a_s)).to(x.dtype).contiguous(memory_format=memory_format(x))
    return y, a_c, a_s, chan, idx_c.int(), pooled, idx_s.int()


def cbam_backward_ref(
    dy: Tensor, da_c: Tensor, da_s: Tensor, x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor,
    a_c: Tensor, a_s: Tensor, chan: Tensor, idx_c: Tensor, pooled: Tensor, idx_s: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The backward contract, written out in PyTorch (see the module docstring)."""
    acc = a_c.dtype
    B, C, H, W = x.shape
    xf, dyf = x.to(acc), dy.to(acc)
    g_c, g_s = torch.sigmoid(a_c)[:, :, None, None], torch.sigmoid(a_s)
    dg_s = (dyf * xf * g_c).sum(dim=1, keepdim=True)
    ga_s = da_s + dg_s * g_s * (1 - g_s)
    k = ws.shape[-1]
    dpooled, dws = torch.ops.aten.convolution_backward(
        ga_s, pooled, ws.to(acc)[None], None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, False]
    )[:2]
    # the max pools' gradients go to their argmax only, as autograd routes them: torch.where, not a product with the
    # one-hot mask, which would spread a NaN or infinite gradient over every other element as 0 * inf = NaN
    at_smax = F.one_hot(idx_s.long(), C).permute(0, 3, 1, 2).bool()  # (B,C,H,W): where c == idx_s
    dxc = dyf * g_s + dpooled[:, :1] / C + torch.where(at_smax, dpooled[:, 1:], 0.0)
    dg_c = (dxc * xf).sum(dim=(2, 3))
    sig = g_c.flatten(1)
    ga_c = da_c + dg_c * sig * (1 - sig)
    dchan, dw1, dw2 = cbam_mlp_backward(ga_c, chan, w1.to(acc), w2.to(acc))
    at_cmax = F.one_hot(idx_c.long(), H * W).reshape(B, C, H, W).bool()
    dx = dxc * g_c + dchan[:, 0, :, None, None] / (H * W) + torch.where(at_cmax, dchan[:, 1, :, None, None], 0.0)
    dx = dx.to(x.dtype).contiguous(memory_format=memory_format(x))
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype), dws[0].to(ws.dtype)


_TORCH = SimpleNamespace(forward=cbam_forward_ref, backward=cbam_backward_ref)
_EXT = compiled_ops("cbam")


def backend_impl(backend: str):
    """The namespace (or module) with ``forward`` / ``backward`` of the contract for ``backend``."""
    return dispatch.backend_impl("cbam", backend, _TORCH, _EXT)


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on x's device: the contract keeps maps and statistics in acc, and autocast would recast the
    Python backends' matmuls and convolutions (Triton's glue, the references) to its low precision. The compiled
    ops keep autocast out themselves."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("askd::fused_cbam", mutates_args=())
def fused_cbam(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor, backend: str) -> Outputs:
    """Fused CBAM forward through a Python ``backend`` (triton, torch); outputs as :func:`cbam_forward_ref`."""
    with _no_autocast(x):
        return tuple(backend_impl(backend).forward(x, w1, w2, ws))


def _fake_forward(x, w1, w2, ws):
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    return (
        torch.empty_like(x),
        x.new_empty((B, C), dtype=acc),
        x.new_empty((B, 1, H, W), dtype=acc),
        x.new_empty((B, 2, C), dtype=acc),
        x.new_empty((B, C), dtype=torch.int32),
        x.new_empty((B, 2, H, W), dtype=acc),
        x.new_empty((B, H, W), dtype=torch.int32),
    )


@torch.library.custom_op("askd::fused_cbam_backward", mutates_args=())
def fused_cbam_backward(
    dy: Tensor, da_c: Tensor, da_s: Tensor, x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor,
    a_c: Tensor, a_s: Tensor, chan: Tensor, idx_c: Tensor, pooled: Tensor, idx_s: Tensor, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Fused CBAM backward through a Python ``backend``; outputs as :func:`cbam_backward_ref`."""
    with _no_autocast(x):
        saved = (a_c, a_s, chan, idx_c, pooled, idx_s)
        return tuple(backend_impl(backend).backward(dy, da_c, da_s, x, w1, w2, ws, *saved))


def _fake_backward(dy, da_c, da_s, x, w1, w2, ws, *saved):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(ws)


fused_cbam.register_fake(lambda *args: _fake_forward(*args[:-1]))
fused_cbam_backward.register_fake(lambda *args: _fake_backward(*args[:-1]))
if hasattr(_EXT, "forward"):
    # the compiled ops' fakes, so torch.compile and opcheck can trace them
    torch.library.register_fake("askd::cbam_forward")(_fake_forward)
    torch.library.register_fake("askd::cbam_backward")(_fake_backward)


def _run_forward(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor, backend: str) -> Outputs:
    if backend == "ext":
        return _EXT.forward(x, w1, w2, ws)
    return fused_cbam(x, w1, w2, ws, backend)


def _run_backward(*args: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "ext":
        return _EXT.backward(*args)
    return fused_cbam_backward(*args, backend)


class _FusedCBAM(torch.autograd.Function):
    """Autograd of the fused CBAM: forward saves the contract's statistics, backward hands them to the backend."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        y, a_c, a_s, chan, idx_c, pooled, idx_s = _run_forward(x, w1, w2, ws, backend)
        ctx.backend = backend
        ctx.save_for_backward(x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s)
        return y, a_c, a_s

    @staticmethod
    def backward(ctx, dy: Tensor, da_c: Tensor, da_s: Tensor):
        x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s = ctx.saved_tensors
        # autograd hands in zeros for unused outputs; the kernels want dy in x's layout
        dy = dy.contiguous(memory_format=memory_format(x))
        grads = _run_backward(
            dy, da_c.contiguous(), da_s.contiguous(), x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s,
            backend=ctx.backend,
        )
        return (*grads, None)


def cbam(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Fused CBAM through ``backend`` (``triton``, ``ext`` or ``torch``): (y, a_c (B,C), a_s (B,1,H,W)).

    x (B,C,H,W) in any layout (copied to NCHW unless it is channels_last); w1 (R,C), w2 (C,R), ws (2,k,k).
    Maps come back in float32 (float64 for float64 x), y in x's dtype and layout.
    """
    check_inputs(x, w1, w2, ws)
    x = x.contiguous(memory_format=memory_format(x))
    return _FusedCBAM.apply(x, w1.contiguous(), w2.contiguous(), ws.contiguous(), backend)


def check_x(x: Tensor, who: str = "fused CBAM") -> None:
    """Raise a TypeError / ValueError, naming ``who``, unless x is a (B,C,H,W) tensor of a dtype every backend takes
    with C, H, W > 0 (B = 0 is fine: an empty batch gives empty outputs, as in PyTorch)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a tensor (B,C,H,W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who}: x must be (B,C,H,W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"{who}: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        # an empty C, H or W has no max to pool
        raise ValueError(f"{who}: x must have C, H and W > 0, got shape {tuple(x.shape)}")


def check_inputs(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> None:
    """Raise a ValueError naming the tensor, expected and actual shape, dtype or device on bad input (a TypeError
    for an argument that is no tensor), and where x's dtype does not fit the weights' as PyTorch's CBAM would
    (:func:`check_dtypes`)."""
    weights = {"w1": w1, "w2": w2, "ws": ws}
    for name, w in weights.items():
        if not isinstance(w, Tensor):
            raise TypeError(f"fused CBAM: {name} must be a tensor, got {type(w).__name__}")
    check_x(x)
    C = x.shape[1]
    if w1.dim() != 2 or w1.shape[0] < 1:
        raise ValueError(f"fused CBAM: w1 must have shape (R,{C}) with R >= 1, got {tuple(w1.shape)}")
    if ws.dim() != 3 or ws.shape[-1] not in (3, 7):
        raise ValueError(f"fused CBAM: ws must be (2,3,3) or (2,7,7), got {tuple(ws.shape)}")
    R, k = w1.shape[0], ws.shape[-1]
    for name, w, shape in (("w1", w1, (R, C)), ("w2", w2, (C, R)), ("ws", ws, (2, k, k))):
        if tuple(w.shape) != shape:
            raise ValueError(f"fused CBAM: {name} must have shape {shape} for C={C}, got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"fused CBAM: {name} is on {w.device} but x is on {x.device}")
        if not w.is_floating_point():
            raise ValueError(f"fused CBAM: {name} must be floating point, got {w.dtype}")
    check_dtypes(x, weights)


class DtypeMismatch(ValueError, RuntimeError):
    """x's dtype does not fit the CBAM weights': a ValueError as every input check of the ops, and a RuntimeError
    as the error PyTorch's own convolutions raise for it (what callers of the plain CBAM module have caught)."""


def check_dtypes(x: Tensor, weights: dict[str, Tensor], who: str = "fused CBAM") -> None:
    """Raise :class:`DtypeMismatch` where PyTorch's CBAM (:mod:`askd.nn.cbam`, backend torch) raises a dtype
    mismatch, also for an empty batch, which PyTorch's convolutions let through.

    Its convolutions need x and each weight in one dtype. Outside autocast that is their own dtype (float64 x
    into a float32 module raises); under autocast it is the dtype autocast hands the convolution: the autocast
    dtype for every floating tensor but a float64 one, which autocast leaves alone. So bfloat16 or float32 x
    with float32 weights runs under bfloat16 autocast, float64 x with float32 weights raises there too.
    """
    cast_to = autocast_dtype(x.device.type)

    def seen(t: Tensor) -> torch.dtype:
        return cast_to if cast_to is not None and t.dtype != torch.float64 else t.dtype

    for name, w in weights.items():
        if seen(w) != seen(x):
            where = f" under autocast to {cast_to}, which leaves float64 alone" if cast_to is not None else ""
            raise DtypeMismatch(
                f"{who}: x is {x.dtype} but {name} is {w.dtype}{where}; PyTorch's CBAM raises on this "
                "mismatch too: cast x to the module's dtype (or the module to x's)"
            )
