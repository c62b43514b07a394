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

The ops ``askd::fused_cbam`` / ``askd::fused_cbam_backward`` dispatch to a backend by name (``triton``:
``askd.kernels.cbam``; ``ext``: ``torch.ops.askd.cbam_forward`` / ``cbam_backward``; ``reference``: the
functions here, for testing the glue) and carry fake kernels and autograd, so ``torch.compile`` treats a
CBAM block as one opaque node without graph breaks.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext

Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and map) dtype for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x is laid out that way (and not also plain contiguous), else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def cbam_ref(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The CBAM formula in plain PyTorch at x's dtype: (y, a_c (B,C), a_s (B,1,H,W)). See :mod:`askd.nn.cbam`."""
    avg = x.mean(dim=(2, 3))
    mx = x.flatten(2).max(dim=2).values
    a_c = F.relu(avg @ w1.t()) @ w2.t() + F.relu(mx @ w1.t()) @ w2.t()
    xc = x * torch.sigmoid(a_c)[:, :, None, None]
    pooled = torch.stack([xc.mean(dim=1), xc.max(dim=1).values], dim=1)
    a_s = F.conv2d(pooled, ws[None], padding=ws.shape[-1] // 2)
    return xc * torch.sigmoid(a_s), a_c, a_s


def _mlp(chan: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """chan (B,2,C) -> (a_c (B,C), hidden (B,2,R) after ReLU)."""
    hidden = F.relu(chan @ w1.t())
    return hidden.sum(dim=1) @ w2.t(), hidden


def cbam_forward_ref(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> Outputs:
    """The forward contract, written out in PyTorch (see the module docstring)."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    flat = xf.flatten(2)
    cmax, idx_c = flat.max(dim=2)
    chan = torch.stack([flat.mean(dim=2), cmax], dim=1)
    a_c, _ = _mlp(chan, w1.to(acc), w2.to(acc))
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
    w1f, w2f, wsf = w1.to(acc), w2.to(acc), ws.to(acc)
    g_c, g_s = torch.sigmoid(a_c)[:, :, None, None], torch.sigmoid(a_s)
    dg_s = (dyf * xf * g_c).sum(dim=1, keepdim=True)
    ga_s = da_s + dg_s * g_s * (1 - g_s)
    k = ws.shape[-1]
    dpooled, dws = torch.ops.aten.convolution_backward(
        ga_s, pooled, wsf[None], None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, False]
    )[:2]
    at_smax = F.one_hot(idx_s.long(), C).permute(0, 3, 1, 2).to(acc)  # (B,C,H,W): 1 where c == idx_s
    dxc = dyf * g_s + dpooled[:, :1] / C + at_smax * dpooled[:, 1:]
    dg_c = (dxc * xf).sum(dim=(2, 3))
    sig = g_c.flatten(1)
    ga_c = da_c + dg_c * sig * (1 - sig)
    _, hidden = _mlp(chan, w1f, w2f)
    dw2 = ga_c.t() @ hidden.sum(dim=1)
    dhidden = (ga_c @ w2f)[:, None, :] * (hidden > 0)
    dw1 = (dhidden.transpose(1, 2) @ chan).sum(dim=0)
    dchan = dhidden @ w1f
    at_cmax = F.one_hot(idx_c.long(), H * W).reshape(B, C, H, W).to(acc)
    dx = dxc * g_c + dchan[:, 0, :, None, None] / (H * W) + at_cmax * dchan[:, 1, :, None, None]
    dx = dx.to(x.dtype).contiguous(memory_format=memory_format(x))
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype), dws[0].to(ws.dtype)


class _Reference:
    forward = staticmethod(cbam_forward_ref)
    backward = staticmethod(cbam_backward_ref)


class _Ext:
    @staticmethod
    def forward(*args):
        return torch.ops.askd.cbam_forward(*args)

    @staticmethod
    def backward(*args):
        return torch.ops.askd.cbam_backward(*args)


def _impl(backend: str):
    if backend == "reference":
        return _Reference
    if backend == "ext":
        return _Ext
    if backend == "triton":
        return importlib.import_module("askd.kernels.cbam")
    raise ValueError(f"fused CBAM has no backend {backend!r}; expected triton, ext or reference")


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on x's device: the contract keeps maps and statistics in acc, and autocast would recast the
    backends' matmuls and convolutions on them (Triton's glue, the reference) to its low precision."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("askd::fused_cbam", mutates_args=())
def fused_cbam(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor, backend: str) -> Outputs:
    """Fused CBAM forward through ``backend``; outputs as :func:`cbam_forward_ref`."""
    with _no_autocast(x):
        return tuple(_impl(backend).forward(x, w1, w2, ws))


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
    """Fused CBAM backward through ``backend``; outputs as :func:`cbam_backward_ref`."""
    with _no_autocast(x):
        return tuple(_impl(backend).backward(dy, da_c, da_s, x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s))


def _fake_backward(dy, da_c, da_s, x, w1, w2, ws, *saved):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(ws)


fused_cbam.register_fake(lambda *args: _fake_forward(*args[:-1]))
fused_cbam_backward.register_fake(lambda *args: _fake_backward(*args[:-1]))
if _ext.load() is not None and hasattr(torch.ops.askd, "cbam_forward"):
    # the compiled ops' own fakes, so torch.compile and opcheck can trace them when called directly
    torch.library.register_fake("askd::cbam_forward")(_fake_forward)
    torch.library.register_fake("askd::cbam_backward")(_fake_backward)


def _setup_context(ctx, inputs, output):
    x, w1, w2, ws, ctx.backend = inputs
    _, a_c, a_s, chan, idx_c, pooled, idx_s = output
    ctx.save_for_backward(x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s)


def _backward(ctx, dy, da_c, da_s, *_):
    x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s = ctx.saved_tensors
    # autograd hands in zeros for unused outputs; kernels want dy in x's layout
    dy = dy.contiguous(memory_format=memory_format(x))
    dx, dw1, dw2, dws = fused_cbam_backward(
        dy, da_c.contiguous(), da_s.contiguous(), x, w1, w2, ws, a_c, a_s, chan, idx_c, pooled, idx_s, ctx.backend
    )
    return dx, dw1, dw2, dws, None


fused_cbam.register_autograd(_backward, setup_context=_setup_context)


def cbam(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Fused CBAM through ``backend`` (``triton``, ``ext`` or ``reference``): (y, a_c (B,C), a_s (B,1,H,W)).

    x (B,C,H,W) in any layout (copied to NCHW unless it is channels_last); w1 (R,C), w2 (C,R), ws (2,k,k).
    Maps come back in float32 (float64 for float64 x), y in x's dtype and layout.
    """
    check_inputs(x, w1, w2, ws)
    x = x.contiguous(memory_format=memory_format(x))
    y, a_c, a_s, *_ = fused_cbam(x, w1.contiguous(), w2.contiguous(), ws.contiguous(), backend)
    return y, a_c, a_s


def check_inputs(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> None:
    """Raise a ValueError naming the tensor, expected and actual shape, dtype or device on bad input, and where
    x's dtype does not fit the weights' as PyTorch's CBAM would (:func:`check_dtypes`)."""
    if x.dim() != 4:
        raise ValueError(f"fused CBAM: x must be (B,C,H,W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"fused CBAM: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    C = x.shape[1]
    R = w1.shape[0] if w1.dim() == 2 else -1
    expected = {"w1": (w1, (R, C)), "w2": (w2, (C, R)), "ws": (ws, (2, ws.shape[-1], ws.shape[-1]))}
    for name, (w, shape) in expected.items():
        if tuple(w.shape) != shape or R < 1:
            raise ValueError(f"fused CBAM: {name} must have shape {shape} for C={C}, got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"fused CBAM: {name} is on {w.device} but x is on {x.device}")
        if not w.is_floating_point():
            raise ValueError(f"fused CBAM: {name} must be floating point, got {w.dtype}")
    if ws.shape[-1] not in (3, 7):
        raise ValueError(f"fused CBAM: ws must be (2,3,3) or (2,7,7), got {tuple(ws.shape)}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        # B = 0 is fine (an empty batch, empty outputs, as in PyTorch); an empty C, H or W has no max to pool
        raise ValueError(f"fused CBAM: x must have C, H and W > 0, got shape {tuple(x.shape)}")
    check_dtypes(x, {"w1": w1, "w2": w2, "ws": ws})


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None where autocast is off (or does not exist)."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return None
    return torch.get_autocast_dtype(device_type)


def check_dtypes(x: Tensor, weights: dict[str, Tensor]) -> None:
    """Raise a ValueError where PyTorch's CBAM (:mod:`askd.nn.cbam`, backend torch) raises a dtype mismatch.

    Its convolutions need x and each weight in one dtype. Outside autocast that is their own dtype (float64 x
    into a float32 module raises); under autocast it is the dtype autocast hands the convolution: the autocast
    dtype for every floating tensor but a float64 one, which autocast leaves alone. So bfloat16 or float32 x
    with float32 weights runs under bfloat16 autocast, float64 x with float32 weights raises there too.
    """
    cast_to = _autocast_dtype(x.device.type)

    def seen(t: Tensor) -> torch.dtype:
        return cast_to if cast_to is not None and t.dtype != torch.float64 else t.dtype

    for name, w in weights.items():
        if seen(w) != seen(x):
            where = f" under autocast to {cast_to}, which leaves float64 alone" if cast_to is not None else ""
            raise ValueError(
                f"fused CBAM: x is {x.dtype} but {name} is {w.dtype}{where}; PyTorch's CBAM raises on this "
                "mismatch too: cast x to the module's dtype (or the module to x's)"
            )
