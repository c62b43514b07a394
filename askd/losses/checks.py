"""Input checks shared by the feature, embedding and logit losses (AT, F-KD, RKD, HORKD, KD): clear errors, not NaN.

Attention-map lists have their own check in :mod:`askd.losses.attention_similarity` (pairs of maps per block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_pair(
    fn: str, teacher: torch.Tensor, student: torch.Tensor, ndim: int, min_batch: int = 1, any_channels: bool = False
) -> None:
    """Teacher and student tensors of ``fn``: same shape (but for dim 1 with ``any_channels``), ``ndim`` dims,
    floating point, one device, at least ``min_batch`` samples, no other dim empty; a ValueError saying which rule
    broke otherwise (a TypeError for what is no tensor)."""
    for who, x in (("teacher", teacher), ("student", student)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {who} input must be a tensor, got {type(x).__name__}")
        if x.dim() != ndim or not x.is_floating_point():
            raise ValueError(f"{fn}: expected a floating-point {ndim}-d {who} tensor, got {tuple(x.shape)} {x.dtype}")
    shapes = [(x.shape[:1] + x.shape[2:]) if any_channels else x.shape for x in (teacher, student)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"{fn}: teacher {tuple(teacher.shape)} != student {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{fn}: teacher on {teacher.device}, student on {student.device}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{fn}: needs a batch of at least {min_batch} samples, got {student.shape[0]}")
    if 0 in teacher.shape[1:] or 0 in student.shape[1:]:
        # a mean over no features is NaN, a normalised empty map meaningless: refuse rather than return those
        raise ValueError(f"{fn}: every dim but the batch must be > 0, got teacher {tuple(teacher.shape)} and student "
                         f"{tuple(student.shape)}")


def check_lists(fn: str, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> None:
    """Per-stage feature lists: the same non-zero length, each pair (B,C_t,H,W) and (B,C_s,H,W) as
    :func:`check_pair` (the channel counts may differ: attention transfer averages over channels)."""
    if not (isinstance(teacher, Sequence) and isinstance(student, Sequence)):
        raise TypeError(f"{fn}: expected lists of stage outputs, got {type(teacher).__name__} and "
                        f"{type(student).__name__}")
    if len(teacher) != len(student) or not student:
        raise ValueError(
            f"{fn}: teacher and student must give the same non-zero number of stage outputs, "
            f"got {len(teacher)} and {len(student)}"
        )
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        check_pair(f"{fn} stage {i}", t, s, ndim=4, any_channels=True)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: losses are reduced in fp32 at least, also under autocast."""
    return torch.promote_types(x.dtype, torch.float32)
