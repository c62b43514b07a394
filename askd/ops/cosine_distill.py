"""Fused A-SKD loss: every map pair in one forward and one backward launch, the contract and its reference.

Maps come as two lists of M tensors (teacher, student), map j of shape (B, ...) and the same shape in both
lists; each is read as B rows of D_j values. With t, s one row of map j and ``eps = 1e-8``::

    stats[j,b] = (dot(t,s), |t|^2, |s|^2)                       accumulated in acc (float32, or float64)
    cos[j,b]   = dot / max(|t| * |s|, eps)
    loss       = scale * sum_j mean_b (1 - cos[j,b])            a 0-dim acc tensor

    d loss / d s = -scale / B * (t / n - dot * s / (n * |s|^2))   with n = |t| * |s|,  if n > eps
                 = -scale / B * t / eps                                                otherwise

``scale`` carries the variant: ``weight`` for ``official`` (sum over all 2N maps), ``weight / 2`` for ``paper``
(mean of the channel and spatial terms per block). Teacher maps get no gradient. Backends: ``triton``
(``kernels.cosine_distill``), ``ext`` (``torch.ops.askd.cosine_distill_forward`` / ``_backward``) and
``reference`` (the functions here).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .. import _ext
from .cbam import acc_dtype

EPS = 1e-8


def cosine_distill_ref(teacher: list[Tensor], student: list[Tensor], scale: float) -> Tensor:
    """``scale * sum_j mean_b(1 - cos(t_jb, s_jb))`` in plain PyTorch, differentiable in ``student``."""
    total = 0.0
    for t, s in zip(teacher, student, strict=True):
        acc = acc_dtype(s.dtype)
        t, s = t.detach().reshape(t.shape[0], -1).to(acc), s.reshape(s.shape[0], -1).to(acc)
        n = torch.linalg.vector_norm(t, dim=1) * torch.linalg.vector_norm(s, dim=1)
        total = total + (1 - (t * s).sum(dim=1) / n.clamp_min(EPS)).mean()
    return scale * total


def cosine_distill_forward_ref(teacher: list[Tensor], student: list[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """The forward contract: (loss (), stats (M,B,3)) as in the module docstring."""
    acc = acc_dtype(student[0].dtype)
    rows = [
        (t.reshape(t.shape[0], -1).to(acc), s.reshape(s.shape[0], -1).to(acc))
        for t, s in zip(teacher, student, strict=True)
    ]
    stats = torch.stack([torch.stack([(t * s).sum(1), (t * t).sum(1), (s * s).sum(1)], dim=1) for t, s in rows])
    cos = stats[..., 0] / (stats[..., 1].sqrt() * stats[..., 2].sqrt()).clamp_min(EPS)
    return scale * (1 - cos).mean(dim=1).sum(), stats


def cosine_distill_backward_ref(
    grad: Tensor, teacher: list[Tensor], student: list[Tensor], stats: Tensor, scale: float
) -> list[Tensor]:
    """The backward contract: d loss / d student map, each like its student map."""
    out = []
    for j, (t, s) in enumerate(zip(teacher, student, strict=True)):
        acc = stats.dtype
        tf, sf = t.reshape(t.shape[0], -1).to(acc), s.reshape(s.shape[0], -1).to(acc)
        dot, tt, ss = stats[j].unbind(dim=1)
        n = tt.sqrt() * ss.sqrt()
        big = n > EPS
        dcos = torch.where(
            big[:, None], tf / n.clamp_min(EPS)[:, None] - (dot / (n * ss).clamp_min(EPS))[:, None] * sf, tf / EPS
        )
        out.append((-grad * scale / s.shape[0] * dcos).to(s.dtype).reshape(s.shape))
    return out


class _Reference:
    forward = staticmethod(cosine_distill_forward_ref)
    backward = staticmethod(cosine_distill_backward_ref)


class _Ext:
    @staticmethod
    def forward(*args):
        return torch.ops.askd.cosine_distill_forward(*args)

    @staticmethod
    def backward(*args):
        return torch.ops.askd.cosine_distill_backward(*args)


def _impl(backend: str):
    if backend == "reference":
        return _Reference
    if backend == "ext":
        return _Ext
    if backend == "triton":
        return importlib.import_module("kernels.cosine_distill")
    raise ValueError(f"fused distillation loss has no backend {backend!r}; expected triton, ext or reference")


@torch.library.custom_op("askd::fused_cosine_distill", mutates_args=())
def fused_cosine_distill(
    teacher: list[Tensor], student: list[Tensor], scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Fused loss forward through ``backend``: (loss (), stats (M,B,3))."""
    return tuple(_impl(backend).forward(teacher, student, scale))


def _fake_forward(teacher, student, scale):
    acc = acc_dtype(student[0].dtype)
    return student[0].new_empty((), dtype=acc), student[0].new_empty((len(student), student[0].shape[0], 3), dtype=acc)


@torch.library.custom_op("askd::fused_cosine_distill_backward", mutates_args=())
def fused_cosine_distill_backward(
    grad: Tensor, teacher: list[Tensor], student: list[Tensor], stats: Tensor, scale: float, backend: str
) -> list[Tensor]:
    """Fused loss backward through ``backend``: one gradient per student map."""
    return list(_impl(backend).backward(grad, teacher, student, stats, scale))


def _fake_backward(grad, teacher, student, stats, scale):
    return [torch.empty_like(s) for s in student]


fused_cosine_distill.register_fake(lambda *args: _fake_forward(*args[:-1]))
fused_cosine_distill_backward.register_fake(lambda *args: _fake_backward(*args[:-1]))
if _ext.load() is not None and hasattr(torch.ops.askd, "cosine_distill_forward"):
    torch.library.register_fake("askd::cosine_distill_forward")(_fake_forward)
    torch.library.register_fake("askd::cosine_distill_backward")(_fake_backward)


def _setup_context(ctx, inputs, output):
    teacher, student, ctx.scale, ctx.backend = inputs
    ctx.save_for_backward(*teacher, *student, output[1])
    ctx.num_maps = len(teacher)


def _backward(ctx, grad, _):
    saved, m = ctx.saved_tensors, ctx.num_maps
    teacher, student, stats = list(saved[:m]), list(saved[m : 2 * m]), saved[-1]
    dstudent = fused_cosine_distill_backward(grad, teacher, student, stats, ctx.scale, ctx.backend)
    return [None] * m, dstudent, None, None


fused_cosine_distill.register_autograd(_backward, setup_context=_setup_context)


def cosine_distill(teacher: list[Tensor], student: list[Tensor], scale: float, backend: str) -> Tensor:
    """The fused loss through ``backend`` (``triton``, ``ext`` or ``reference``): a 0-dim acc tensor.

    Maps of mixed dtypes are first cast to one (the promotion of all of them); teacher maps are detached.
    """
    check_maps(teacher, student)
    dtype = student[0].dtype
    for m in (*teacher, *student):
        dtype = torch.promote_types(dtype, m.dtype)
    teacher = [t.detach().to(dtype).contiguous() for t in teacher]
    student = [s.to(dtype).contiguous() for s in student]
    return fused_cosine_distill(teacher, student, float(scale), backend)[0]


def check_maps(teacher: list[Tensor], student: list[Tensor]) -> None:
    """Raise a ValueError naming the map and what was wrong (count, shape, batch, dtype, device)."""
    if len(teacher) != len(student) or not student:
        raise ValueError(
            f"fused loss: need as many teacher as student maps (> 0), got {len(teacher)} and {len(student)}"
        )
    batch, device = student[0].shape[0] if student[0].dim() else None, student[0].device
    for j, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"fused loss: map {j}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if s.dim() < 2 or s.shape[0] != batch:
            raise ValueError(f"fused loss: map {j}: expected shape (B={batch}, ...), got {tuple(s.shape)}")
        if t.device != device or s.device != device:
            raise ValueError(f"fused loss: map {j}: teacher on {t.device}, student on {s.device}, expected {device}")
        if not (t.is_floating_point() and s.is_floating_point()):
            raise ValueError(f"fused loss: map {j}: maps must be floating point, got {t.dtype} and {s.dtype}")
