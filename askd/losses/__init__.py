"""Distillation losses: A-SKD (attention cosine) and logit KD, on one interface of teacher/student outputs."""

from .askd import attention_distill_loss, cosine_distance
from .kd import kd_loss

__all__ = ["attention_distill_loss", "cosine_distance", "kd_loss"]
