"""Fused A-SKD loss: every map pair in one forward and one backward launch, the contract and its reference.

Maps come as two lists of M tensors (teacher, student), map j of shape (B, ...) and the same shape in both
lists; each is read as B rows of D_j values. With t, s one row of map j and ``eps = 1e-8``::

    stats[j,b] = (dot(t,s), |t|^2, |s|^2)                       accumulated in acc (float32, or float64)
    cos[j,b]   = dot / max(|t| * |s|, eps)
    loss       = weight * sum_j mean_b (1 - cos[j,b])            a 0-dim acc tensor

    d loss / d s = -weight / B * (t / n - dot * s / (n * |s|^2))   with n = |t| * |s|,  if n > eps
                 = -weight / B * t / eps                                                otherwise

B must be > 0: the mean over an empty batch is undefined, so every backend (and :func:`check_maps`, before
dispatch) raises a clear error for B = 0 rather than return NaN. A NaN anywhere in row b of a map makes that
row's dot and norms NaN, so its loss term and its whole gradient row are NaN, as PyTorch's autograd gives
(a NaN n takes the ``n > eps`` branch below).

``weight`` is every map's weight, and carries the variant: the loss weight for ``official`` (sum over all 2N
maps), half of it for ``paper`` (mean of the channel and spatial terms per block). Teacher maps get no
gradient. Backends: ``triton`` (``askd.kernels.cosine_distill``), ``ext``
(``torch.ops.askd.cosine_distill_forward`` / ``_backward``) and ``torch`` (the functions here).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

from ..numerics import EPS, acc_dtype
from . import dispatch
from .dispatch import compiled_ops


def cosine_distance(t: Tensor, s: Tensor, eps: float = EPS) -> Tensor:
    """mean_b(1 - cos(t_b, s_b)) for one map pair t, s (B, ...), in acc; differentiable in ``s`` only."""
    acc = acc_dtype(s.dtype)
    t, s = t.detach().reshape(t.shape[0], -1).to(acc), s.reshape(s.shape[0], -1).to(acc)
    n = torch.linalg.vector_norm(t, dim=1) * torch.linalg.vector_norm(s, dim=1)
    return (1 - (t * s).sum(dim=1) / n.clamp_min(eps)).mean()


def cosine_distill_ref(teacher: list[Tensor], student: list[Tensor], weight: float) -> Tensor:
    """``weight * sum_j mean_b(1 - cos(t_jb, s_jb))`` in plain PyTorch, differentiable in ``student``: the formula
    itself, which the ``torch`` backend of :func:`askd.losses.attention_distill_loss` runs."""
    return weight * torch.stack([cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)]).sum()


def cosine_distill_forward_ref(teacher: list[Tensor], student: list[Tensor], weight: float) -> tuple[Tensor, Tensor]:
    """The forward contract: (loss (), stats (M,B,3)) as in the module docstring."""
    acc = acc_dtype(student[0].dtype)
    rows = [
        (t.reshape(t.shape[0], -1).to(acc), s.reshape(s.shape[0], -1).to(acc))
        for t, s in zip(teacher, student, strict=True)
    ]
    stats = torch.stack([torch.stack([(t * s).sum(1), (t * t).sum(1), (s * s).sum(1)], dim=1) for t, s in rows])
    cos = stats[..., 0] / (stats[..., 1].sqrt() * stats[..., 2].sqrt()).clamp_min(EPS)
    return weight * (1 - cos).mean(dim=1).sum(), stats


def cosine_distill_backward_ref(
    grad: Tensor, teacher: list[Tensor], student: list[Tensor], stats: Tensor, weight: float
) -> list[Tensor]:
    """The backward contract: d loss / d student map, each like its student map."""
    out = []
    for j, (t, s) in enumerate(zip(teacher, student, strict=True)):
        acc = stats.dtype
        tf, sf = t.reshape(t.shape[0], -1).to(acc), s.reshape(s.shape[0], -1).to(acc)
        dot, tt, ss = stats[j].unbind(dim=1)
        n = tt.sqrt() * ss.sqrt()
        big = ~(n <= EPS)  # a NaN n takes the first branch: the whole row's gradient is NaN, as in autograd
        # n > eps makes |s| > 0: n |s|^2 needs no clamp, and one at eps would be wrong for a small |s| (n |s|^2 < eps)
        ratio = dot / torch.where(big, n * ss, 1.0)
        dcos = torch.where(big[:, None], tf / n.clamp_min(EPS)[:, None] - ratio[:, None] * sf, tf / EPS)
        out.append((-grad * weight / s.shape[0] * dcos).to(s.dtype).reshape(s.shape))
    return out


_TORCH = SimpleNamespace(forward=cosine_distill_forward_ref, backward=cosine_distill_backward_ref)
_EXT = compiled_ops("cosine_distill")


def backend_impl(backend: str):
    """The namespace (or module) with ``forward`` / ``backward`` of the contract for ``backend``."""
    return dispatch.backend_impl("cosine_distill", backend, _TORCH, _EXT)


def grads_in_forward(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` computes the student gradients in the forward pass on ``device`` (ext on a CPU:
    there a separate backward pass would read every map again for nothing)."""
    return backend == "ext" and device.type == "cpu" and hasattr(torch.ops.askd, "cosine_distill_forward_grad")


def _forward(
    teacher: list[Tensor], student: list[Tensor], weight: float, backend: str, with_grad: bool
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The body of ``askd::fused_cosine_distill`` (see there), callable without the custom-op wrapper."""
    impl = backend_impl(backend)
    if with_grad and grads_in_forward(backend, student[0].device):
        loss, stats, dstudent = impl.forward_grad(teacher, student, weight)
        return loss, stats, list(dstudent)
    loss, stats = impl.forward(teacher, student, weight)
    return loss, stats, []


@torch.library.custom_op("askd::fused_cosine_distill", mutates_args=())
def fused_cosine_distill(
    teacher: list[Tensor], student: list[Tensor], weight: float, backend: str, with_grad: bool
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Fused loss forward through ``backend``: (loss (), stats (M,B,3), dstudent).

    dstudent holds d loss / d student for a unit upstream gradient when ``with_grad`` and
    :func:`grads_in_forward`; otherwise it is empty and backward runs the backend's backward kernel.
    """
    return _forward(teacher, student, weight, backend, with_grad)


def _fake_forward(teacher, student, weight):
    acc = acc_dtype(student[0].dtype)
    return student[0].new_empty((), dtype=acc), student[0].new_empty((len(student), student[0].shape[0], 3), dtype=acc)


@fused_cosine_distill.register_fake
def _(teacher, student, weight, backend, with_grad):
    grads = [torch.empty_like(s) for s in student] if with_grad and grads_in_forward(backend, student[0].device) else []
    return (*_fake_forward(teacher, student, weight), grads)


@torch.library.custom_op("askd::fused_cosine_distill_backward", mutates_args=())
def fused_cosine_distill_backward(
    grad: Tensor, teacher: list[Tensor], student: list[Tensor], stats: Tensor, weight: float, backend: str
) -> list[Tensor]:
    """Fused loss backward through ``backend``: one gradient per student map."""
    return list(backend_impl(backend).backward(grad, teacher, student, stats, weight))


def _fake_backward(grad, teacher, student, stats, weight):
    return [torch.empty_like(s) for s in student]


fused_cosine_distill_backward.register_fake(lambda *args: _fake_backward(*args[:-1]))
if hasattr(_EXT, "forward"):
    torch.library.register_fake("askd::cosine_distill_forward")(_fake_forward)
    torch.library.register_fake("askd::cosine_distill_backward")(_fake_backward)
    torch.library.register_fake("askd::cosine_distill_forward_grad")(
        lambda t, s, weight: (*_fake_forward(t, s, weight), [torch.empty_like(m) for m in s])
    )


def _run_forward(teacher, student, weight, backend, with_grad):
    # ext calls its compiled ops directly: they are registered ops with fake kernels already, and the Python
    # custom-op wrapper around them cost a quarter of the CPU kernel's time with ~100 tensors. The Python
    # backends (triton, torch) need the custom op so that torch.compile sees one opaque node.
    if backend == "ext":
        return _forward(teacher, student, weight, backend, with_grad)
    return fused_cosine_distill(teacher, student, weight, backend, with_grad)


def _run_backward(grad, teacher, student, stats, weight, backend):
    if backend == "ext":
        return _EXT.backward(grad, teacher, student, stats, weight)
    return fused_cosine_distill_backward(grad, teacher, student, stats, weight, backend)


class _CosineDistill(torch.autograd.Function):
    """Autograd of the fused loss. A plain autograd.Function, not ``register_autograd`` on the custom op:
    with ~100 tensor arguments the custom-op autograd wrapper alone costs about as much as the CPU kernels.
    The teacher maps come in one list, which autograd does not look into: they get no gradient, and the
    engine tracks half as many inputs. torch.compile traces this Function whole."""

    @staticmethod
    def forward(ctx, weight: float, backend: str, teacher: list[Tensor], *student: Tensor) -> Tensor:
        student = list(student)
        with_grad = any(ctx.needs_input_grad[3:])
        loss, stats, dstudent = _run_forward(teacher, student, weight, backend, with_grad)
        ctx.weight, ctx.backend, ctx.m, ctx.grads_saved = weight, backend, len(teacher), bool(dstudent)
        ctx.save_for_backward(*(dstudent if dstudent else (*teacher, *student, stats)))
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved, m = ctx.saved_tensors, ctx.m
        if not ctx.grads_saved:
            dstudent = _run_backward(grad, list(saved[:m]), list(saved[m:-1]), saved[-1], ctx.weight, ctx.backend)
        elif not torch.compiler.is_compiling() and grad.device.type == "cpu" and grad.item() == 1.0:
            dstudent = saved  # the usual case: the loss enters a sum, so the forward's gradients are final
        else:
            dstudent = torch._foreach_mul(list(saved), grad)
        return (None, None, None, *dstudent)


def cosine_distill(
    teacher: list[Tensor], student: list[Tensor], weight: float, backend: str, checked: bool = False
) -> Tensor:
    """The fused loss through ``backend`` (``triton``, ``ext`` or ``torch``): a 0-dim acc tensor.

    Maps of mixed dtypes are first cast to one (the promotion of all of them); teacher maps get no gradient.
    ``checked=True`` skips :func:`check_maps` for a caller that has validated the maps already.
    """
    if not checked:
        check_maps(teacher, student)
    teacher, student = promoted(teacher, student)
    # the kernels read rows of contiguous maps; CBAM's maps already are, so this is usually a no-op
    if not all(m.is_contiguous() for m in (*teacher, *student)):
        teacher, student = [t.contiguous() for t in teacher], [s.contiguous() for s in student]
    return _CosineDistill.apply(float(weight), backend, teacher, *student)


def promoted(teacher: list[Tensor], student: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The maps cast to one dtype, the promotion of all of them, where they have several: what every backend
    computes in, so that each returns the loss in the same dtype (float64 for a float64 teacher and float32 student)."""
    dtypes = {m.dtype for m in (*teacher, *student)}
    if len(dtypes) == 1:
        return teacher, student
    dtype = functools.reduce(torch.promote_types, dtypes)
    return [t.to(dtype) for t in teacher], [s.to(dtype) for s in student]


def check_maps(teacher: list[Tensor], student: list[Tensor], names: list[str] | None = None) -> None:
    """Raise a ValueError naming the map and what was wrong (count, shape, batch, dtype, device).

    ``names`` label the maps in the messages (default ``map j``). An empty batch (B = 0) raises too: the loss is
    a mean over the batch, undefined for none, and a clear error beats the NaN (or, in PyTorch, the reshape
    error) it would otherwise give.
    """
    if len(teacher) != len(student) or not student:
        raise ValueError(
            f"distillation loss: need as many teacher as student maps (> 0), got {len(teacher)} and {len(student)}"
        )
    names = names or [f"map {j}" for j in range(len(student))]
    for name, t, s in zip(names, teacher, student, strict=True):
        if not (isinstance(t, Tensor) and isinstance(s, Tensor)):
            raise TypeError(f"{name}: maps must be tensors, got {type(t).__name__} and {type(s).__name__}")
        if s.dim() < 2:
            raise ValueError(f"{name}: expected shape (B, ...) with at least 2 dims, got {tuple(s.shape)}")
    batch, device = student[0].shape[0], student[0].device
    check_batch(batch)
    for name, t, s in zip(names, teacher, student, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"{name}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if s.shape[0] != batch:
            raise ValueError(f"{name}: expected shape (B={batch}, ...), got {tuple(s.shape)}")
        if t.device != device or s.device != device:
            raise ValueError(f"{name}: teacher on {t.device}, student on {s.device}, expected {device}")
        if not (t.is_floating_point() and s.is_floating_point()):
            raise ValueError(f"{name}: maps must be floating point, got {t.dtype} and {s.dtype}")


def check_batch(batch: int | None) -> None:
    """Raise the ValueError every backend gives for an empty batch (B = 0), whose mean is undefined."""
    if batch == 0:
        raise ValueError("the distillation loss needs at least one sample, got batch size 0")
