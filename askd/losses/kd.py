"""Hinton logit distillation on the ArcFace head outputs (the authors' first release).

    L = T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T)),   T = 4

t and s are the s-scaled margin logits (B, N) of teacher and student; the teacher is detached. Method ``kd``
weights it by ``kd_weight`` (1, as the authors' release) with T = ``kd_temperature``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_pair, compute_dtype
from .registry import Outputs, Weighted, register


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Temperature-scaled KL divergence of logits (B,N), averaged over the batch; a scalar, fp32 at least."""
    check_pair("kd_loss", teacher_logits, student_logits, ndim=2)
    if not temperature > 0:  # NaN too: T <= 0 flips or breaks the softmax without an error of its own
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits)
    t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


@register
class KD(Weighted):
    name = "kd"
    needs = frozenset({"teacher", "teacher_logits"})
    paper = "Hinton et al. 2015, on the ArcFace logits as the A-SKD authors' first release"
    weight_key = "kd_weight"

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.temperature = cfg.kd_temperature

    def loss(self, out: Outputs) -> torch.Tensor:
        return kd_loss(out.teacher_logits, out.student_logits, self.temperature)
