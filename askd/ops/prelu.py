"""PReLU with one weight per channel on 4-D x: the contract, its reference, and the compiled backward.

x (B,C,H,W), NCHW or channels_last, weight (C,), upstream gradient g like x::

    y     = max(x, 0) + w_c * min(x, 0)        = x where x > 0, else w_c * x        (aten's prelu)
    dx    = g * (1 if x > 0 else w_c)          at x == 0 the slope w_c, as aten's _prelu_kernel_backward
    dw_c  = sum_{b,h,w} g * min(x, 0)          = sum of g * x where x <= 0; accumulated in acc (float32, float64
                                               for float64 input), returned in weight's dtype

As aten: a NaN x gives y NaN, dx = w_c * g and a NaN dw_c; where x > 0 nothing is added to dw_c, even for an
infinite or NaN g (which a literal g * min(x, 0) would turn into NaN).

Why: aten's backward (torch 2.13) is a scalar loop that branches on the sign of x, which mispredicts on real
activations, and it writes a full-size weight gradient that autograd then reduces to (C,). The compiled backward
(``torch.ops.askd.prelu_backward``, ``csrc/cpu/prelu.cpp``) is one branch-free vectorised pass that reads x and g,
writes dx and reduces dw. The forward is aten's on every backend: it is vectorised and reads x once. Backends of
the backward: ``ext`` (CPU only) and ``torch`` (:func:`prelu_backward_ref`, the reference, no faster than aten's
own backward, so :class:`askd.nn.prelu.PReLU` runs aten's autograd wherever ext cannot).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..numerics import acc_dtype, memory_format
from . import dispatch
from .dispatch import compiled_ops


def prelu_ref(x: Tensor, weight: Tensor) -> Tensor:
    """y = max(x, 0) + w_c * min(x, 0), written as aten computes it (x where x > 0, else w_c * x), which differs
    from the sum only in the sign of a zero; differentiable by autograd."""
    return torch.where(x > 0, x, weight[:, None, None] * x)


def prelu_backward_ref(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The backward contract: (dx like x, in x's layout; dw (C,) in weight's dtype)."""
    acc = acc_dtype(x.dtype)
    pos = x > 0  # x == 0 and a NaN x take the slope, as in aten
    dx = torch.where(pos, grad, grad * weight[:, None, None]).contiguous(memory_format=memory_format(x))
    dw = torch.where(pos, 0.0, grad.to(acc) * x.to(acc)).sum(dim=(0, 2, 3))
    return dx, dw.to(weight.dtype)


_TORCH = SimpleNamespace(backward=prelu_backward_ref)
_EXT = compiled_ops("prelu")


def backend_impl(backend: str):
    """The namespace with ``backward`` of the contract for ``backend`` (``ext`` or ``torch``)."""
    if backend not in ("ext", "torch"):
        raise ValueError(f"prelu has no {backend!r} backend; expected ext or torch")
    return dispatch.backend_impl("prelu", backend, _TORCH, _EXT)


def _ext_runs(device_type: str) -> bool:
    if not hasattr(_EXT, "backward"):
        return False
    key = torch._C._dispatch_key_for_device(device_type)
    return torch._C._dispatch_has_computed_kernel_for_dispatch_key("askd::prelu_backward", key)


# the device types with a compiled prelu_backward kernel (the CPU, in a build that has it); fixed once the
# extension is loaded, so a set that torch.compile reads as a constant
EXT_DEVICES = frozenset(d for d in ("cpu", "cuda") if _ext_runs(d))


def _fake_backward(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return dx, torch.empty_like(weight, memory_format=torch.contiguous_format)


if hasattr(_EXT, "backward"):
    torch.library.register_fake("askd::prelu_backward")(_fake_backward)


class _PReLU(torch.autograd.Function):
    """aten's prelu forward, the backward of ``backend``. Saves x and the weight, as aten's autograd does."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, backend: str) -> Tensor:
        ctx.backend = backend
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    @once_differentiable  # the compiled backward has no gradient of its own: a double backward raises, not lies
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        dx, dw = backend_impl(ctx.backend).backward(grad, x, weight)
        return dx, dw, None


def prelu(x: Tensor, weight: Tensor, backend: str = "ext") -> Tensor:
    """PReLU of x (B,C,H,W) with weight (C,) of x's dtype, the backward through ``backend`` (``ext``, ``torch``)."""
    if x.dim() != 4 or weight.shape != (x.shape[1],):
        raise ValueError(f"prelu: need x (B,C,H,W) and weight (C,), got {tuple(x.shape)} and {tuple(weight.shape)}")
    backend_impl(backend)
    return _PReLU.apply(x, weight, backend)
