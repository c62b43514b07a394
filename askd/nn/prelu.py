"""PReLU whose backward runs the compiled one-pass kernel on 4-D input where the ``ext`` backend runs.

:class:`PReLU` is ``nn.PReLU`` (same ``weight`` parameter, same state_dict, so checkpoints load unchanged)
with a ``backend`` as :class:`askd.nn.CBAM`'s. On 4-D x (B,C,H,W), NCHW or channels_last, with one weight per
channel, backend ``ext`` (``"auto"`` on a CPU with the extension built; ``--fused``) keeps aten's forward and
computes the gradients with ``torch.ops.askd.prelu_backward`` (contract and formulas: :mod:`askd.ops.prelu`):
one vectorised pass over x and g instead of aten's branching scalar loop, its full-size weight gradient and the
reduction of it. Everywhere else (backend torch or triton, a GPU, no gradient to compute, other shapes, a
shared weight, a build without the kernel) it is ``nn.PReLU`` exactly. Under autocast it casts x and the weight
as autocast casts ``prelu`` (to the autocast dtype, float64 left alone), so outputs and gradient dtypes are
``nn.PReLU``'s. Like the other ext ops it is differentiable once: a double backward raises.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backend as backends
from ..numerics import autocast_dtype
from ..ops import prelu as prelu_ops


class PReLU(nn.PReLU):
    """``nn.PReLU(num_parameters, init)`` with the compiled backward for backend ``ext`` (see the module docstring).

    Args:
        num_parameters, init, device, dtype: as ``nn.PReLU``.
        backend: ``"torch"``, ``"triton"``, ``"ext"``, ``"auto"`` or None (``$ASKD_BACKEND``, else torch).
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25, device=None, dtype=None,
                 backend: str | None = None):  # fmt: skip
        super().__init__(num_parameters, init, device=device, dtype=dtype)
        if backend is not None:
            backends.check_name(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # without a gradient to compute (a frozen teacher, inference) aten's forward is all there is
        grads = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if not grads or x.dim() != 4 or w.numel() != x.shape[1]:
            return super().forward(x)
        # an explicit backend that cannot run raises here, as in CBAM; ext without a PReLU kernel for the device
        # (CUDA) runs aten's
        name = backends.resolve_constant(self.backend, x.device.type)
        if name != "ext" or x.device.type not in prelu_ops.EXT_DEVICES:
            return super().forward(x)
        cast_to = autocast_dtype(x.device.type)
        if cast_to is not None:
            x, w = (t.to(cast_to) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (x, w))
        if x.dtype != w.dtype or not x.is_floating_point():
            return super().forward(x)  # aten's error for the mismatch, or its integer handling
        return prelu_ops.prelu(x, w, "ext")

    def extra_repr(self) -> str:
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        return super().extra_repr() + backend

