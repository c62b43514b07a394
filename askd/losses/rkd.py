"""Relational knowledge distillation (Park et al., CVPR 2019; lenscloth/RKD) on embeddings (B,E).

    d(e)_ij  = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)) for i != j, 0 on the diagonal      (B,B)
    distance = smooth_l1(d(s) / mean(d(s) > 0), d(t) / mean(d(t) > 0))   mean of the positive entries
    a(e)_ijk = <u_ij, u_ik>, u_ij = normalize(e_j - e_i)  (u_ii = 0)      the cosine of the angle at e_i
    angle    = smooth_l1(a(s).flatten(), a(t).flatten())                   over all B^3 triplets
    rkd      = w_dist * distance + w_angle * angle,  w_dist = 1, w_angle = 2 (the RKD paper's weights)

smooth_l1 is PyTorch's (beta 1, mean over entries). The teacher side is detached. The distance term is
invariant to a global scale of either embedding set and the angle term to a translation. Both need B >= 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_pair, compute_dtype
from .registry import Method, Outputs, register

MIN_SQ_DIST = 1e-12  # the squared distances' floor: sqrt stays differentiable, duplicate samples give no NaN


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """(B,E) -> (B,B) Euclidean distances between the rows, clamped as in the module docstring."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(MIN_SQ_DIST).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def mean_normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """:func:`pairwise_distances` divided by the mean of its positive entries."""
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """(B,E) -> (B*B*B,): cos of the angle at e_i between e_j and e_k, for every (i, j, k)."""
    u = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # u[i, j] = normalize(e_j - e_i)
    return torch.bmm(u, u.transpose(1, 2)).flatten()


def _cast(fn: str, teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_pair(fn, teacher_emb, student_emb, ndim=2, min_batch=2)
    dtype = compute_dtype(student_emb)
    return teacher_emb.detach().to(dtype), student_emb.to(dtype)


def rkd_distance(teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> torch.Tensor:
    """The distance term, unweighted; a scalar."""
    t, s = _cast("rkd_distance", teacher_emb, student_emb)
    return F.smooth_l1_loss(mean_normalised_distances(s), mean_normalised_distances(t))


def rkd_angle(teacher_emb: torch.Tensor, student_emb: torch.Tensor) -> torch.Tensor:
    """The angle term, unweighted; a scalar."""
    t, s = _cast("rkd_angle", teacher_emb, student_emb)
    return F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))


def rkd_loss(teacher_emb: torch.Tensor, student_emb: torch.Tensor, w_dist: float = 1.0, w_angle: float = 2.0):
    """``w_dist * distance + w_angle * angle``; a scalar."""
    return w_dist * rkd_distance(teacher_emb, student_emb) + w_angle * rkd_angle(teacher_emb, student_emb)


@register
class RKD(Method):
    """The two terms, logged apart: weights ``rkd_distance_weight`` (1) and ``rkd_angle_weight`` (2)."""

    name = "rkd"
    needs = frozenset({"teacher"})
    paper = "Park et al., CVPR 2019 (lenscloth/RKD)"

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.w_dist, self.w_angle = cfg.rkd_distance_weight, cfg.rkd_angle_weight

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        t, s = out.teacher_emb, out.student_emb
        return {"rkd_distance": self.w_dist * rkd_distance(t, s), "rkd_angle": self.w_angle * rkd_angle(t, s)}
