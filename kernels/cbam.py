"""Fused CBAM in Triton: the ``triton`` backend of :func:`askd.ops.cbam.cbam` (contract: :mod:`askd.ops.cbam`).

Shapes: x (B,C,H,W), NCHW- or channels_last-contiguous; p = h*W + w indexes the P = H*W pixels. Both layouts
give p a single stride (W*sw == sh), so every kernel takes x's (batch, channel, pixel) strides and works on
[BLOCK_C, BLOCK_P] tiles of one sample. Grids: per-channel reductions over P run on (B, cdiv(C, BLOCK_C)),
per-pixel reductions over C on (B, cdiv(P, BLOCK_P)), elementwise passes on (B, cdiv(P, BLOCK_P),
cdiv(C, BLOCK_C)). The channel MLP and the kxk spatial conv act on (B,2,C) and (B,2,H,W) and stay in PyTorch.

Numerics: loads are cast to ACC (float32, float64 for float64 x) and every sum, max and product is taken in
ACC; y and dx are cast to x's dtype on store. x * g_c is recomputed (never stored) and in the same order as
the reference, so the spatial max/argmax see the same values. Max-pools follow torch.max: a NaN ranks above
every number (the max is NaN and the argmax the first NaN), otherwise the first index wins ties. Offsets are
64-bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from askd.numerics import acc_dtype, cbam_mlp, cbam_mlp_backward

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

# (BLOCK_C, BLOCK_P) upper bounds, clamped to the problem, and warps, chosen for a GPU: reductions take a long
# run along the reduced axis, the elementwise passes a square-ish tile
_PER_CHANNEL = (16, 128)  # reduce over P
_PER_PIXEL = (32, 64)  # reduce over C
_ELEMENTWISE = (32, 64)
_WARPS = 4


def _blocks(C: int, P: int, caps: tuple[int, int]) -> tuple[int, int]:
    return min(triton.next_power_of_2(C), caps[0]), min(triton.next_power_of_2(P), caps[1])


@triton.jit
def _block_max(v, idx, n, AXIS: tl.constexpr):
    """(max, first argmax) of the tile v along AXIS as torch.max takes them: NaN where the tile holds a NaN, at
    its first one. idx: each element's index (broadcast against v), below n except in -inf padding. tl.max
    alone would not do: on a GPU it drops NaNs."""
    is_nan = v != v
    mx = tl.max(tl.where(is_nan, float("-inf"), v), axis=AXIS)
    # one min finds both: key idx for a NaN, n + idx for a maximum, 2n for the rest
    key = tl.where(is_nan, idx, tl.where(v == tl.expand_dims(mx, AXIS), idx + n, 2 * n))
    first = tl.min(key, axis=AXIS)
    has_nan = first < n
    return tl.where(has_nan, float("nan"), mx), tl.where(has_nan, first, first - n)


@triton.jit
def _takes_max(v, m):
    """Whether a later block's (max) v replaces the running max m: v > m, or v is the first NaN."""
    return ((v > m) | (v != v)) & (m == m)


@triton.jit
def _cbam_chan_pool_kernel(
    x_ptr, chan_ptr, idx_c_ptr, C, P, sb, sc, sp,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Pass 1, per (b,c): chan[b,0,c] = mean_p x, chan[b,1,c] = max_p x, idx_c[b,c] = first argmax."""
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    rows = x_ptr + b * sb + cs.to(tl.int64)[:, None] * sc
    total = tl.zeros([BLOCK_C], ACC)
    best = tl.full([BLOCK_C], float("-inf"), ACC)
    best_i = tl.zeros([BLOCK_C], tl.int32)
    for start in range(0, P, BLOCK_P):
        ps = start + tl.arange(0, BLOCK_P)
        ok = c_ok[:, None] & (ps < P)[None, :]
        v = tl.load(rows + ps.to(tl.int64)[None, :] * sp, mask=ok, other=float("-inf")).to(ACC)
        total += tl.sum(tl.where(ok, v, 0.0), axis=1)
        blk, blk_i = _block_max(v, ps[None, :], P, 1)
        better = _takes_max(blk, best)  # strict: an equal later maximum keeps the earlier index
        best = tl.where(better, blk, best)
        best_i = tl.where(better, blk_i, best_i)
    out = chan_ptr + b * 2 * C + cs
    tl.store(out, total / P, mask=c_ok)
    tl.store(out + C, best, mask=c_ok)
    tl.store(idx_c_ptr + b * C + cs, best_i, mask=c_ok)


@triton.jit
def _cbam_spatial_pool_kernel(
    x_ptr, g_c_ptr, pooled_ptr, idx_s_ptr, C, P, sb, sc, sp,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Pass 3, per (b,p), xc = x * g_c: pooled[b,0,p] = mean_c xc, pooled[b,1,p] = max_c xc, idx_s = argmax."""
    # Pass 1 transposed, written out on purpose: the same running mean / max / first argmax, but over C with
    # [BLOCK_C, BLOCK_P] tiles reduced along axis 0 and x scaled by g_c as it loads. One kernel for both would
    # need the reduced axis, the masks and the scaling as constexpr branches, harder to read than the two.
    b = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    cols = x_ptr + b * sb + ps.to(tl.int64)[None, :] * sp
    total = tl.zeros([BLOCK_P], ACC)
    best = tl.full([BLOCK_P], float("-inf"), ACC)
    best_i = tl.zeros([BLOCK_P], tl.int32)
    for start in range(0, C, BLOCK_C):
        cs = start + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        ok = c_ok[:, None] & p_ok[None, :]
        g = tl.load(g_c_ptr + b * C + cs, mask=c_ok, other=0.0)
        v = tl.load(cols + cs.to(tl.int64)[:, None] * sc, mask=ok, other=0.0).to(ACC) * g[:, None]
        total += tl.sum(v, axis=0)
        v = tl.where(ok, v, float("-inf"))
        blk, blk_i = _block_max(v, cs[:, None], C, 0)
        better = _takes_max(blk, best)
        best = tl.where(better, blk, best)
        best_i = tl.where(better, blk_i, best_i)
    out = pooled_ptr + b * 2 * P + ps
    tl.store(out, total / C, mask=p_ok)
    tl.store(out + P, best, mask=p_ok)
    tl.store(idx_s_ptr + b * P + ps, best_i, mask=p_ok)


@triton.jit
def _cbam_apply_kernel(
    x_ptr, g_c_ptr, g_s_ptr, y_ptr, C, P, sb, sc, sp,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Pass 5, elementwise: y = x * g_c[b,c] * g_s[b,p], stored in y's dtype (y has x's strides)."""
    b = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (cs < C)[:, None] & (ps < P)[None, :]
    offs = b * sb + cs.to(tl.int64)[:, None] * sc + ps.to(tl.int64)[None, :] * sp
    g_c = tl.load(g_c_ptr + b * C + cs, mask=cs < C, other=0.0)
    g_s = tl.load(g_s_ptr + b * P + ps, mask=ps < P, other=0.0)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    tl.store(y_ptr + offs, (v * g_c[:, None] * g_s[None, :]).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cbam_spatial_grad_kernel(
    dy_ptr, x_ptr, g_c_ptr, dg_s_ptr, C, P, sb, sc, sp,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Backward pass B1, per (b,p): dg_s[b,p] = sum_c dy * x * g_c (dy has x's strides)."""
    b = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    cols = b * sb + ps.to(tl.int64)[None, :] * sp
    total = tl.zeros([BLOCK_P], ACC)
    for start in range(0, C, BLOCK_C):
        cs = start + tl.arange(0, BLOCK_C)
        ok = (cs < C)[:, None] & p_ok[None, :]
        offs = cols + cs.to(tl.int64)[:, None] * sc
        g = tl.load(g_c_ptr + b * C + cs, mask=cs < C, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        total += tl.sum(dy * v * g[:, None], axis=0)
    tl.store(dg_s_ptr + b * P + ps, total, mask=p_ok)


@triton.jit
def _cbam_dxc(dy, g_s, dp_mean, dp_max, is_smax, C):
    """d loss / d xc = dy * g_s + dpooled0 / C + [c == idx_s] * dpooled1, on a [BLOCK_C, BLOCK_P] tile."""
    return dy * g_s[None, :] + dp_mean[None, :] / C + tl.where(is_smax, dp_max[None, :], 0.0)


@triton.jit
def _spatial_side(g_s_ptr, dpooled_ptr, idx_s_ptr, b, ps, p_ok, P):
    """What the spatial gate hands back for pixels ps of sample b: g_s, both halves of dpooled, idx_s."""
    g_s = tl.load(g_s_ptr + b * P + ps, mask=p_ok, other=0.0)
    dp_mean = tl.load(dpooled_ptr + b * 2 * P + ps, mask=p_ok, other=0.0)
    dp_max = tl.load(dpooled_ptr + b * 2 * P + P + ps, mask=p_ok, other=0.0)
    smax = tl.load(idx_s_ptr + b * P + ps, mask=p_ok, other=-1)
    return g_s, dp_mean, dp_max, smax


@triton.jit
def _cbam_chan_grad_kernel(
    dy_ptr, x_ptr, g_s_ptr, dpooled_ptr, idx_s_ptr, dg_c_ptr, C, P, sb, sc, sp,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Backward pass B2, per (b,c): dg_c[b,c] = sum_p dxc * x (see ``_cbam_dxc``)."""
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    rows = b * sb + cs.to(tl.int64)[:, None] * sc
    total = tl.zeros([BLOCK_C], ACC)
    for start in range(0, P, BLOCK_P):
        ps = start + tl.arange(0, BLOCK_P)
        p_ok = ps < P
        ok = c_ok[:, None] & p_ok[None, :]
        offs = rows + ps.to(tl.int64)[None, :] * sp
        g_s, dp_mean, dp_max, smax = _spatial_side(g_s_ptr, dpooled_ptr, idx_s_ptr, b, ps, p_ok, P)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        dxc = _cbam_dxc(dy, g_s, dp_mean, dp_max, cs[:, None] == smax[None, :], C)
        total += tl.sum(tl.where(ok, dxc * v, 0.0), axis=1)
    tl.store(dg_c_ptr + b * C + cs, total, mask=c_ok)


@triton.jit
def _cbam_dx_kernel(
    dy_ptr, x_ptr, g_c_ptr, g_s_ptr, dpooled_ptr, idx_s_ptr, dchan_ptr, idx_c_ptr, dx_ptr, C, P, sb, sc, sp,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Backward pass B3, elementwise: dx = dxc * g_c + dchan0 / P + [p == idx_c] * dchan1 (dx has x's strides)."""
    b = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok, p_ok = cs < C, ps < P
    ok = c_ok[:, None] & p_ok[None, :]
    offs = b * sb + cs.to(tl.int64)[:, None] * sc + ps.to(tl.int64)[None, :] * sp
    g_s, dp_mean, dp_max, smax = _spatial_side(g_s_ptr, dpooled_ptr, idx_s_ptr, b, ps, p_ok, P)
    g_c = tl.load(g_c_ptr + b * C + cs, mask=c_ok, other=0.0)
    dc_mean = tl.load(dchan_ptr + b * 2 * C + cs, mask=c_ok, other=0.0)
    dc_max = tl.load(dchan_ptr + b * 2 * C + C + cs, mask=c_ok, other=0.0)
    cmax = tl.load(idx_c_ptr + b * C + cs, mask=c_ok, other=-1)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
    dxc = _cbam_dxc(dy, g_s, dp_mean, dp_max, cs[:, None] == smax[None, :], C)
    dx = dxc * g_c[:, None] + dc_mean[:, None] / P + tl.where(ps[None, :] == cmax[:, None], dc_max[:, None], 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _geometry(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """(B, C, P, batch stride, channel stride, pixel stride) of an NCHW- or channels_last-contiguous x."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"triton CBAM: x must be NCHW- or channels_last-contiguous, got strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"triton CBAM: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    B, C, H, W = x.shape
    sb, sc, _, sw = x.stride()
    return B, C, H * W, sb, sc, sw


def _elementwise_grid(B: int, C: int, P: int, block_c: int, block_p: int) -> tuple[int, int, int]:
    return B, triton.cdiv(P, block_p), triton.cdiv(C, block_c)


def forward(x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor) -> tuple[Tensor, ...]:
    """x (B,C,H,W), w1 (R,C), w2 (C,R), ws (2,k,k) -> y (like x), a_c (B,C), a_s (B,1,H,W), chan (B,2,C),
    idx_c (B,C) int32, pooled (B,2,H,W), idx_s (B,H,W) int32; maps in acc (float32, float64 for float64 x)."""
    B, C, P, sb, sc, sp = _geometry(x)
    H, W = x.shape[2:]
    acc = acc_dtype(x.dtype)
    if B == 0:  # an empty batch: empty outputs, and no launch on an empty grid
        empty = [x.new_empty(shape, dtype=acc) for shape in ((0, C), (0, 1, H, W), (0, 2, C), (0, 2, H, W))]
        idx = [x.new_empty(shape, dtype=torch.int32) for shape in ((0, C), (0, H, W))]
        return torch.empty_like(x), empty[0], empty[1], empty[2], idx[0], empty[3], idx[1]
    meta = {"ACC": _TL_ACC[acc], "num_warps": _WARPS}
    chan = x.new_empty((B, 2, C), dtype=acc)
    idx_c = x.new_empty((B, C), dtype=torch.int32)
    bc, bp = _blocks(C, P, _PER_CHANNEL)
    _cbam_chan_pool_kernel[(B, triton.cdiv(C, bc))](x, chan, idx_c, C, P, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp, **meta)

    a_c, _ = cbam_mlp(chan, w1.to(acc), w2.to(acc))
    g_c = torch.sigmoid(a_c)

    pooled = x.new_empty((B, 2, H, W), dtype=acc)
    idx_s = x.new_empty((B, H, W), dtype=torch.int32)
    bc, bp = _blocks(C, P, _PER_PIXEL)
    _cbam_spatial_pool_kernel[(B, triton.cdiv(P, bp))](
        x, g_c, pooled, idx_s, C, P, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp, **meta
    )

    a_s = F.conv2d(pooled, ws.to(acc)[None], padding=ws.shape[-1] // 2)
    y = torch.empty_like(x)
    bc, bp = _blocks(C, P, _ELEMENTWISE)
    _cbam_apply_kernel[_elementwise_grid(B, C, P, bc, bp)](
        x, g_c, torch.sigmoid(a_s), y, C, P, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp, **meta
    )
    return y, a_c, a_s, chan, idx_c, pooled, idx_s


def backward(
    dy: Tensor, da_c: Tensor, da_s: Tensor, x: Tensor, w1: Tensor, w2: Tensor, ws: Tensor,
    a_c: Tensor, a_s: Tensor, chan: Tensor, idx_c: Tensor, pooled: Tensor, idx_s: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """dy (like x, same strides), da_c (B,C), da_s (B,1,H,W) and the forward's inputs and outputs
    -> dx (like x), dw1 (R,C), dw2 (C,R), dws (2,k,k), each in its input's dtype."""
    B, C, P, sb, sc, sp = _geometry(x)
    if B == 0:  # an empty batch: empty dx, weight gradients summed over no samples, no launch (any dy strides)
        return torch.empty_like(x), torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(ws)
    if dy.stride() != x.stride():
        raise ValueError(f"triton CBAM: dy must have x's strides {x.stride()}, got {dy.stride()}")
    acc = a_c.dtype
    meta = {"ACC": _TL_ACC[acc], "num_warps": _WARPS}
    # the small maps are indexed as dense (B,C), (B,P), (B,2,P) arrays
    g_c, g_s = torch.sigmoid(a_c).contiguous(), torch.sigmoid(a_s).contiguous()
    idx_c, idx_s = idx_c.contiguous(), idx_s.contiguous()

    dg_s = a_s.new_empty(a_s.shape)
    bc, bp = _blocks(C, P, _PER_PIXEL)
    _cbam_spatial_grad_kernel[(B, triton.cdiv(P, bp))](
        dy, x, g_c, dg_s, C, P, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp, **meta
    )
    ga_s = da_s + dg_s * g_s * (1 - g_s)
    k = ws.shape[-1]
    dpooled, dws = torch.ops.aten.convolution_backward(
        ga_s, pooled, ws.to(acc)[None], None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, False]
    )[:2]
    dpooled = dpooled.contiguous()

    dg_c = a_c.new_empty(a_c.shape)
    bc, bp = _blocks(C, P, _PER_CHANNEL)
    _cbam_chan_grad_kernel[(B, triton.cdiv(C, bc))](
        dy, x, g_s, dpooled, idx_s, dg_c, C, P, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp, **meta
    )
    ga_c = da_c + dg_c * g_c * (1 - g_c)
    dchan, dw1, dw2 = cbam_mlp_backward(ga_c, chan, w1.to(acc), w2.to(acc))
    dchan = dchan.contiguous()

    dx = torch.empty_like(x)
    bc, bp = _blocks(C, P, _ELEMENTWISE)
    _cbam_dx_kernel[_elementwise_grid(B, C, P, bc, bp)](
        dy, x, g_c, g_s, dpooled, idx_s, dchan, idx_c, dx, C, P, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp, **meta
    )
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype), dws[0].to(ws.dtype)
