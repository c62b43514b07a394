"""F-KD: feature distillation of the penultimate features (Massoli et al., Image and Vision Computing 2020).

    L = mean_{b,e}((s_be - t_be)^2)        F.mse_loss(student_emb, teacher_emb), as the F-KD code

on the embeddings (B,E), the backbone's output before the margin. Method ``fkd`` weights it by
``fkd_weight`` = 0.1: the default ``--lambda_ 0.1`` of the authors' ``main.py``
(fvmassoli/cross-resolution-face-recognition), whose loss is ``CE + lambda * mse(student, teacher)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_pair, compute_dtype
from .registry import Outputs, Weighted, register


def fkd_loss(teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and (detached) teacher embeddings (B,E); a scalar, fp32 at least."""
    check_pair("fkd_loss", teacher_emb, student_emb, ndim=2)
    dtype = compute_dtype(student_emb)
    return F.mse_loss(student_emb.to(dtype), teacher_emb.detach().to(dtype))


@register
class FKD(Weighted):
    name = "fkd"
    needs = frozenset({"teacher"})
    paper = "Massoli et al., IVC 2020 (fvmassoli/cross-resolution-face-recognition)"
    weight_key = "fkd_weight"

    def loss(self, out: Outputs) -> torch.Tensor:
        return fkd_loss(out.teacher_emb, out.student_emb)
