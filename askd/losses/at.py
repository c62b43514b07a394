"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as its official code, and the paper's AT*.

Per stage output f (B,C,H,W) of teacher and student (the four IR-ResNet stages):

    at(f)  = normalize(mean_c(f^2).flatten(1))            (B, H*W), L2-normalised per sample (eps 1e-12)
    AT:    L = sum_stages mean_{b,p}((at(s) - at(t))^2)     method ``at``: weighted by beta/2, beta = 1000
    AT*:   L = sum_stages mean_b(1 - cos(at(t), at(s)))     method ``at_cos`` (A-SKD Table 3): weight 5

The cosine is A-SKD's (:func:`askd.ops.cosine_distill.cosine_distance`, eps 1e-8). The maps average over channels,
so teacher and student may differ in width. Computed in fp32 at least; the teacher is detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops.cosine_distill import cosine_distance
from .checks import check_lists, compute_dtype
from .registry import Outputs, Weighted, register


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B,H*W): the channel mean of f^2, flattened and L2-normalised per sample."""
    return F.normalize(f.to(compute_dtype(f)).pow(2).mean(1).flatten(1), dim=1)


def at_loss(teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over stages of mean((at(s) - at(t))^2), unweighted; a scalar."""
    check_lists("at_loss", teacher_feats, student_feats)
    per_stage = [
        (attention_map(s) - attention_map(t.detach())).pow(2).mean()
        for t, s in zip(teacher_feats, student_feats, strict=True)
    ]
    return torch.stack(per_stage).sum()


def at_cos_loss(teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over stages of mean_b(1 - cos(at(t_b), at(s_b))), unweighted; a scalar."""
    check_lists("at_cos_loss", teacher_feats, student_feats)
    per_stage = [
        cosine_distance(attention_map(t.detach()), attention_map(s))
        for t, s in zip(teacher_feats, student_feats, strict=True)
    ]
    return torch.stack(per_stage).sum()


@register
class AT(Weighted):
    """``at_beta / 2 * at_loss`` (config key ``at_beta``, 1000 as the AT code)."""

    name = "at"
    needs = frozenset({"teacher", "stages"})
    paper = "Zagoruyko & Komodakis, ICLR 2017 (szagoruyko/attention-transfer)"
    weight_key, weight_factor = "at_beta", 0.5

    def loss(self, out: Outputs) -> torch.Tensor:
        return at_loss(out.teacher_stages, out.student_stages)


@register
class ATCos(AT):
    """``at_cos_weight * at_cos_loss`` (config key ``at_cos_weight``, 5 as A-SKD's weight); AT's inputs."""

    name, paper = "at_cos", "AT* of the A-SKD paper (Table 3): AT maps with the cosine distance"
    weight_key, weight_factor = "at_cos_weight", 1.0

    def loss(self, out: Outputs) -> torch.Tensor:
        return at_cos_loss(out.teacher_stages, out.student_stages)
