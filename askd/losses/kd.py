"""Hinton logit distillation on the ArcFace head outputs (the authors' first release).

    L = T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T)),   T = 4

t and s are the s-scaled margin logits (B, N) of teacher and student; the teacher is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Temperature-scaled KL divergence, averaged over the batch; a scalar."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_loss: teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(student_logits.shape)}"
        )
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2
