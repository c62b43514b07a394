"""Hinton logit distillation on the ArcFace head outputs (the authors' first release).

    L = T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T)),   T = 4

t and s are the s-scaled margin logits (B, N) of teacher and student; the teacher is detached. Method ``kd``
weights it by ``kd_weight`` (1, as the authors' release) with T = ``kd_temperature``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Outputs, Weighted, register


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Temperature-scaled KL divergence, averaged over the batch; a scalar."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_loss: teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(student_logits.shape)}"
        )
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
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
