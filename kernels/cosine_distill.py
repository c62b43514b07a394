"""Fused A-SKD loss in Triton: the ``triton`` backend of :func:`askd.ops.cosine_distill.cosine_distill` (contract:
:mod:`askd.ops.cosine_distill`).

Shapes: M teacher/student map pairs, map j contiguous and read as (B, D_j); all maps share one dtype.
The maps are not concatenated: a small flat int64 table is the only host-to-device copy: the data addresses
of the teacher, student (and, for backward, d student) maps, the D_j, then the bits of the float64 ``weight``
(exact for float64 maps). Each program turns an address back into a typed pointer (the multi-tensor-apply
pattern). This works on a GPU and under ``TRITON_INTERPRET=1`` on CPU tensors, where the interpreter
dereferences raw host addresses; it would not with CUDA tensors under the interpreter, which copies only the
tensors passed as arguments to the host.

Grid (B, M) for both launches: program (b, j) reduces or writes row b of map j in BLOCK chunks. Forward:
stats[j,b] = (dot, |t|^2, |s|^2) in ACC (float32; float64 for float64 maps); the last program to finish
(an acq_rel atomic counter) sums the loss over all (j, b) in a fixed order, so the loss is deterministic
with one launch. Backward: d s = -grad * weight / B * (t / n - dot / (n |s|^2) * s), n = |t| |s|,
or -grad * weight / B * t / eps where n <= eps; stored in the maps' dtype. A NaN in a row makes n NaN and so,
as in PyTorch, that row's whole gradient. B must be > 0: the mean over an empty batch is undefined.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from askd.numerics import EPS as _EPS
from askd.numerics import acc_dtype

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_BLOCK = 1024  # elements of one row per step (maps are up to 56*56 = 3136 values per sample)
_BLOCK_LOSS = 256  # (j, b) rows per step of the final loss sum
_WARPS = 4


@triton.jit
def _clamp_min(v, lo):
    """max(v, lo) keeping NaN, as torch.clamp_min does (tl.maximum drops NaN on a GPU)."""
    return tl.where(v < lo, lo, v)


@triton.jit
def _map_row(table_ptr, field, j, b, d, M, DT: tl.constexpr):
    """Typed pointer to row b (of length d) of the map whose address is table[field, j]."""
    return tl.load(table_ptr + field * M + j).to(tl.pointer_type(DT)) + b * d


@triton.jit
def _pair_rows(table_ptr, ADDRS: tl.constexpr, M, DT: tl.constexpr):
    """This program's (b, j): b, j, D_j (column ADDRS of the table, after its ADDRS address columns) and the
    typed pointers to row b of teacher and student map j."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    d = tl.load(table_ptr + ADDRS * M + j)
    return b, j, d, _map_row(table_ptr, 0, j, b, d, M, DT), _map_row(table_ptr, 1, j, b, d, M, DT)


@triton.jit
def _cosine_distill_fwd_kernel(
    table_ptr, stats_ptr, loss_ptr, count_ptr, B, M,
    DT: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_LOSS: tl.constexpr,
):  # fmt: skip
    """table: teacher addresses (M), student addresses (M), D (M), weight. -> stats (M,B,3), then loss ()."""
    b, j, d, t_ptr, s_ptr = _pair_rows(table_ptr, 2, M, DT)
    dot = tl.zeros([BLOCK], ACC)
    tt = tl.zeros([BLOCK], ACC)
    ss = tl.zeros([BLOCK], ACC)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + offs, mask=offs < d, other=0.0).to(ACC)
        s = tl.load(s_ptr + offs, mask=offs < d, other=0.0).to(ACC)
        dot += t * s
        tt += t * t
        ss += s * s
    out = stats_ptr + (j * B + b) * 3
    tl.store(out, tl.sum(dot, axis=0))
    tl.store(out + 1, tl.sum(tt, axis=0))
    tl.store(out + 2, tl.sum(ss, axis=0))
    # the barrier orders every thread's stores before the (single-thread) atomic, whose release makes them
    # visible to whichever program sees its increment: the classic "last block reduces" pattern
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if done == M * B - 1:
        weight = tl.load(table_ptr + 3 * M).to(tl.float64, bitcast=True).to(ACC)
        _loss_sum(stats_ptr, loss_ptr, M * B, B, weight, ACC, EPS, BLOCK_LOSS)


@triton.jit
def _loss_sum(stats_ptr, loss_ptr, rows, B, weight, ACC: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr):
    """loss = weight / B * sum over the (j, b) rows of stats of (1 - dot / max(|t| |s|, eps))."""
    total = tl.zeros([BLOCK], ACC)
    for start in range(0, rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < rows
        # volatile: read the other programs' results from memory, not from a stale cache line
        dot = tl.load(stats_ptr + r * 3, mask=ok, other=0.0, volatile=True)
        tt = tl.load(stats_ptr + r * 3 + 1, mask=ok, other=0.0, volatile=True)
        ss = tl.load(stats_ptr + r * 3 + 2, mask=ok, other=0.0, volatile=True)
        total += tl.where(ok, 1 - dot / _clamp_min(tl.sqrt(tt) * tl.sqrt(ss), EPS), 0.0)
    tl.store(loss_ptr, weight * (tl.sum(total, axis=0) / B))


@triton.jit
def _cosine_distill_bwd_kernel(
    table_ptr, stats_ptr, grad_ptr, B, M,
    DT: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """table: teacher, student, d student addresses (M each), D (M), weight. -> row b of d student map j."""
    b, j, d, t_ptr, s_ptr = _pair_rows(table_ptr, 3, M, DT)
    ds_ptr = _map_row(table_ptr, 2, j, b, d, M, DT)
    weight = tl.load(table_ptr + 4 * M).to(tl.float64, bitcast=True).to(ACC)
    row = stats_ptr + (j * B + b) * 3
    dot, tt, ss = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    n = tl.sqrt(tt) * tl.sqrt(ss)
    # a NaN n (a NaN anywhere in the row) takes the first branch: the whole row's gradient is NaN, as in torch
    big = (n > EPS) | (n != n)
    n = _clamp_min(n, EPS)
    # n > eps makes |s| > 0, so n |s|^2 needs no clamp (one at eps was wrong for a small |s|: n |s|^2 < eps)
    k = dot / tl.where(big, n * ss, 1.0)
    coef = -tl.load(grad_ptr) * weight / B
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + offs, mask=offs < d, other=0.0).to(ACC)
        s = tl.load(s_ptr + offs, mask=offs < d, other=0.0).to(ACC)
        dcos = tl.where(big, t / n - k * s, t / EPS)
        tl.store(ds_ptr + offs, (coef * dcos).to(DT), mask=offs < d)


def _table(device: torch.device, weight: float, *columns: list[int]) -> Tensor:
    """The flat int64 table: the columns (M values each), then weight's float64 bits; one copy to ``device``."""
    bits = torch.tensor([weight], dtype=torch.float64).view(torch.int64)
    return torch.cat([torch.tensor(columns, dtype=torch.int64).flatten(), bits]).to(device)


def _check(teacher: list[Tensor], student: list[Tensor]) -> tuple[int, int, torch.dtype, list[int]]:
    """(M, B, the maps' dtype, D_j for each map), or a ValueError naming the map that does not fit."""
    dtype = student[0].dtype
    if student[0].dim() and student[0].shape[0] == 0:
        raise ValueError(
            f"triton distillation loss: the distillation loss needs at least one sample, got batch size 0 "
            f"(map 0 has shape {tuple(student[0].shape)})"
        )
    if dtype not in _TL:
        raise ValueError(f"triton distillation loss: maps must be float32/64, bfloat16 or float16, got {dtype}")
    for j, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.dtype != dtype or s.dtype != dtype or not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"triton distillation loss: map {j} must be contiguous {dtype}, got {t.dtype}, {s.dtype}")
    return len(student), student[0].shape[0], dtype, [math.prod(s.shape[1:]) for s in student]


def forward(teacher: list[Tensor], student: list[Tensor], weight: float) -> tuple[Tensor, Tensor]:
    """M map pairs, map j (B, ...) -> loss () and stats (M,B,3) = (dot, |t|^2, |s|^2), both in acc."""
    M, B, dtype, widths = _check(teacher, student)
    acc = acc_dtype(dtype)
    device = student[0].device
    table = _table(device, weight, [t.data_ptr() for t in teacher], [s.data_ptr() for s in student], widths)
    stats = torch.empty((M, B, 3), dtype=acc, device=device)
    loss = torch.empty((), dtype=acc, device=device)
    count = torch.zeros((), dtype=torch.int32, device=device)
    _cosine_distill_fwd_kernel[(B, M)](
        table, stats, loss, count, B, M,
        DT=_TL[dtype], ACC=_TL[acc], EPS=_EPS, BLOCK=_BLOCK, BLOCK_LOSS=_BLOCK_LOSS, num_warps=_WARPS,
    )  # fmt: skip
    return loss, stats


def backward(grad: Tensor, teacher: list[Tensor], student: list[Tensor], stats: Tensor, weight: float) -> list[Tensor]:
    """grad () of the loss, the M map pairs and stats (M,B,3) -> d loss / d student map j, each like its map."""
    M, B, dtype, widths = _check(teacher, student)
    out = [torch.empty_like(s) for s in student]
    addresses = [[m.data_ptr() for m in maps] for maps in (teacher, student, out)]
    table = _table(student[0].device, weight, *addresses, widths)
    _cosine_distill_bwd_kernel[(B, M)](
        table, stats.contiguous(), grad.to(stats.dtype), B, M,
        DT=_TL[dtype], ACC=_TL[stats.dtype], EPS=_EPS, BLOCK=_BLOCK, num_warps=_WARPS,
    )  # fmt: skip
    return out
