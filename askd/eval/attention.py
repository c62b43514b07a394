"""Teacher-student attention similarity: pooled pixel-level Pearson r of the CBAM maps (paper fig. 6).

The teacher sees the HR images, the student their LR version ``transform(x)``; both models return
``(embedding (B,E), maps)`` with one ``(channel_map (B,C), spatial_map (B,1,H,W))`` per CBAM block.
For every block, r pools all images and positions: every teacher value of that block's map is paired
with the student value at the same image and position. Images are uint8 (N,3,H,W), fed as [-1,1].

The sums r needs are accumulated in fp64 batch by batch, so no block's maps are kept for all images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.cbam import check_map_pairs
from .embed import Transform, check_images, eval_mode, image_batches


def pearson(a, b) -> float:
    """Pearson r of two equal-size tensors (any shapes, flattened, in fp64).

    Returns 0.0 when either is constant, where r is undefined (0/0): no linear relation is measurable.
    """
    a = torch.as_tensor(a).detach().reshape(-1).double()
    b = torch.as_tensor(b).detach().reshape(-1).double()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"pearson needs two non-empty tensors of equal size, got {a.numel()} and {b.numel()} values")
    if a.min() == a.max() or b.min() == b.max():
        return 0.0
    da, db = a - a.mean(), b - b.mean()
    r = (da * db).sum() / torch.sqrt((da * da).sum() * (db * db).sum())
    return float(r.clamp(-1.0, 1.0))


class PearsonAccumulator:
    """Pooled Pearson r over many (x, y) chunks from running fp64 sums n, Sx, Sy, Sxx, Syy, Sxy.

    The sums are of x - x0 and y - y0, (x0, y0) the first pair seen: r is shift-invariant, and the shift
    keeps ``n*Sxx - Sx^2`` from cancelling catastrophically when the mean dwarfs the spread; it also makes
    the variance of constant data exactly 0, which :meth:`value` reports as r = 0.0 (as :func:`pearson`).
    """

    def __init__(self):
        self.n = 0
        self.shift: tuple[float, float] | None = None
        self.sums = torch.zeros(5, dtype=torch.float64)  # Sx, Sy, Sxx, Syy, Sxy

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the values of x and y (equal sizes, any shapes), paired position by position."""
        x, y = x.detach().reshape(-1).double(), y.detach().reshape(-1).double()
        if x.numel() != y.numel():
            raise ValueError(f"x and y must have the same number of values, got {x.numel()} and {y.numel()}")
        if x.numel() == 0:
            return
        if self.shift is None:
            self.shift = (x[0].item(), y[0].item())
        dx, dy = x - self.shift[0], y - self.shift[1]
        self.sums += torch.stack([dx.sum(), dy.sum(), (dx * dx).sum(), (dy * dy).sum(), (dx * dy).sum()]).cpu()
        self.n += x.numel()

    def value(self) -> float:
        """Pearson r of everything added so far; 0.0 when either side is constant or nothing was added."""
        sx, sy, sxx, syy, sxy = self.sums.tolist()
        var_x, var_y = self.n * sxx - sx * sx, self.n * syy - sy * sy
        if var_x <= 0 or var_y <= 0:
            return 0.0
        return max(-1.0, min(1.0, (self.n * sxy - sx * sy) / math.sqrt(var_x * var_y)))


def attention_correlation(
    teacher: nn.Module, student: nn.Module, images, transform: Transform, batch_size: int = 64, device="cpu"
) -> list[dict]:
    """Per-block pooled Pearson r between the teacher's maps on HR images and the student's on LR ones.

    images: uint8 (N,3,H,W); transform: the LR synthesis on a float batch in [-1,1], e.g.
    ``lambda x: degrade(x, 14)``. Both models run in eval mode under ``torch.inference_mode()``.
    Returns ``[{"block": i, "channel_r": float, "spatial_r": float}, ...]``, one dict per CBAM block.
    """
    images = check_images(images)
    if not callable(transform):
        raise ValueError(f"transform must be a callable on the float batch, got {type(transform).__name__}")
    channel: list[PearsonAccumulator] = []
    spatial: list[PearsonAccumulator] = []
    with eval_mode(teacher, student), torch.inference_mode():
        for x in image_batches(images, batch_size, device):
            teacher_maps, student_maps = teacher(x)[1], student(transform(x))[1]
            if not channel:
                channel = [PearsonAccumulator() for _ in teacher_maps]
                spatial = [PearsonAccumulator() for _ in teacher_maps]
            check_map_pairs(teacher_maps, student_maps)
            if len(student_maps) != len(channel):
                raise ValueError(f"the models gave {len(student_maps)} map pairs, {len(channel)} on the first batch")
            for i, ((tc, ts), (sc, ss)) in enumerate(zip(teacher_maps, student_maps, strict=True)):
                channel[i].update(tc, sc)
                spatial[i].update(ts, ss)
    pairs = enumerate(zip(channel, spatial, strict=True))
    return [{"block": i, "channel_r": c.value(), "spatial_r": s.value()} for i, (c, s) in pairs]
