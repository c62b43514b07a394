"""HORKD: hybrid order relational knowledge distillation (Ge et al., AAAI 2020), as the A-SKD supplement ran it.

On embeddings t (teacher) and s (student), (B,E), with labels (B,) and class centres u (C,E) of teacher
embeddings (horkd_paper equations 2-8; the supplement's eq. 1 with alpha 0.1, beta 0.2, gamma 0.1):

    L   = L1 + alpha * L2 + beta * L3 + gamma * LC
    L1  = mean_{b,e} |s_be - t_be|                  individual level: the "L1" of the supplement's "L1+Huber"
    L2  = RKD distance term                         pair level   (:func:`askd.losses.rkd.rkd_distance`)
    L3  = RKD angle term                            triplet level (:func:`askd.losses.rkd.rkd_angle`)
    LC  = smooth_l1(D(s) / mean D(s), D(t) / mean D(t)),  D(e)_bc = |e_b - u_c|    group level, (B,C)

Choices the paper leaves open, made here:
- The pair and triplet terms use RKD's smooth-L1 (Huber, beta 1), the "Huber" of "L1+Huber", not the square
  difference the HORKD text names for the pair term; the supplement says its HORKD followed the RKD code.
- The centre distances are normalised like the pair distances (each (B,C) matrix divided by its mean), so
  LC does not depend on the embeddings' global scale either; the paper gives D without normalisation.
- Reductions are means (over entries), as RKD's; the paper writes sums.
- The centres are the running means of the frozen teacher's embeddings per class, over every batch the method
  has seen in this phase (:class:`HORKD`): the cumulative mean, which after one epoch is the paper's class mean
  (eq. 6) of the training set up to flips, since the teacher is frozen. They are updated with the batch before
  its loss, without gradient, so a sample's own class always has a centre. Classes not seen yet (a NaN row in
  ``centres``) are left out of LC.
The teacher side is detached. Under torchrun the centres are updated with the global batch in every process,
while the four terms compare the samples of each process's share, as RKD's (any DDP run of a batch-relational
loss without gathering the embeddings does the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import all_gather_cat
from .checks import check_pair, compute_dtype
from .registry import Method, Outputs, register
from .rkd import MIN_SQ_DIST, rkd_angle, rkd_distance


def centre_distances(e: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B,E), (C,E) -> (B,C) Euclidean distances, the squares clamped at 1e-12 as RKD's."""
    sq = e.pow(2).sum(1)[:, None] + centres.pow(2).sum(1)[None, :] - 2 * e @ centres.T
    return sq.clamp_min(MIN_SQ_DIST).sqrt()


def centre_term(teacher_emb: torch.Tensor, student_emb: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """LC over the known (finite) centres, unweighted; a scalar."""
    dtype = compute_dtype(student_emb)
    known = centres[torch.isfinite(centres).all(1)].to(dtype)
    dt = centre_distances(teacher_emb.detach().to(dtype), known)
    ds = centre_distances(student_emb.to(dtype), known)
    return F.smooth_l1_loss(ds / ds.mean(), dt / dt.mean())


def check_labels(labels: torch.Tensor, num_classes: int, emb: torch.Tensor) -> None:
    """Labels (B,) int in [0, num_classes) on emb's device; a ValueError saying what is wrong otherwise."""
    if not isinstance(labels, torch.Tensor) or labels.shape != emb.shape[:1] or labels.dtype not in (torch.int32,
                                                                                                      torch.int64):
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"horkd_loss: labels must be int (B={emb.shape[0]},), got {got}")
    if labels.device != emb.device:
        raise ValueError(f"horkd_loss: labels on {labels.device}, embeddings on {emb.device}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"horkd_loss: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")


def check_centres(labels: torch.Tensor, centres: torch.Tensor, emb: torch.Tensor) -> None:
    """Labels (B,) int in [0, C) whose centres are known; centres (C,E) floating point on emb's device."""
    if (not isinstance(centres, torch.Tensor) or centres.dim() != 2 or centres.shape[1] != emb.shape[1]
            or not centres.is_floating_point()):
        got = f"{tuple(centres.shape)} {centres.dtype}" if isinstance(centres, torch.Tensor) else type(centres).__name__
        raise ValueError(f"horkd_loss: centres must be floating (C,E={emb.shape[1]}), got {got}")
    check_labels(labels, len(centres), emb)
    if centres.device != emb.device:
        raise ValueError(f"horkd_loss: centres on {centres.device}, embeddings on {emb.device}")
    if not torch.isfinite(centres[labels]).all():
        raise ValueError("horkd_loss: a sample's own class has no centre yet; update the centres with the batch first")


def horkd_loss(
    teacher_emb: torch.Tensor,
    student_emb: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 0.2,
    gamma: float = 0.1,
) -> torch.Tensor:
    """``L1 + alpha * L2 + beta * L3 + gamma * LC`` of the module docstring; a scalar."""
    return sum(w * term for w, term in zip((1.0, alpha, beta, gamma),
                                           horkd_terms(teacher_emb, student_emb, labels, centres), strict=True))


def horkd_terms(teacher_emb, student_emb, labels, centres) -> tuple[torch.Tensor, ...]:
    """The four unweighted terms (L1, L2, L3, LC)."""
    check_pair("horkd_loss", teacher_emb, student_emb, ndim=2, min_batch=2)
    check_centres(labels, centres, student_emb)
    dtype = compute_dtype(student_emb)
    l1 = F.l1_loss(student_emb.to(dtype), teacher_emb.detach().to(dtype))
    return (l1, rkd_distance(teacher_emb, student_emb), rkd_angle(teacher_emb, student_emb),
            centre_term(teacher_emb, student_emb, centres))


class ClassCentres(torch.nn.Module):
    """Per-class running means of teacher embeddings: buffers ``sums`` (C,E) and ``counts`` (C,), float32
    whatever the autocast dtype (a class sees a few thousand embeddings in a whole run)."""

    def __init__(self, num_classes: int, embedding_size: int):
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, embedding_size))
        self.register_buffer("counts", torch.zeros(num_classes))

    @torch.no_grad()
    def update(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of teacher embeddings (B,E) of classes ``labels`` (B,). Under torchrun, every process
        adds the whole global batch (its processes' shares in rank order), so the centres stay the same in
        each and equal to a single process's."""
        emb, labels = all_gather_cat(emb.detach()), all_gather_cat(labels)
        self.sums.index_add_(0, labels, emb.to(self.sums.dtype))
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    def means(self) -> torch.Tensor:
        """(C,E): the centres, NaN rows for classes not seen yet."""
        return self.sums / self.counts[:, None].where(self.counts[:, None] > 0, torch.nan)


@register
class HORKD(Method):
    """The four weighted terms, logged apart; weights 1, ``horkd_alpha``, ``horkd_beta``, ``horkd_gamma``.

    State: :class:`ClassCentres` of the data's classes, in the checkpoint with the model."""

    name = "horkd"
    needs = frozenset({"teacher"})
    paper = "Ge et al., AAAI 2020 (HORKD), as the A-SKD supplement ran it (L1 + Huber)"

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.weights = (1.0, cfg.horkd_alpha, cfg.horkd_beta, cfg.horkd_gamma)
        self.centres = ClassCentres(num_classes, cfg.embedding_size)

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        # the batch is checked before the centres take it in: a bad one must not stay in the method's state
        check_pair("horkd_loss", out.teacher_emb, out.student_emb, ndim=2, min_batch=2)
        check_labels(out.labels, len(self.centres.counts), out.student_emb)
        if not torch.isfinite(out.teacher_emb).all():
            raise ValueError("horkd: the teacher's embeddings hold NaN or inf; the class centres would keep them "
                             "for the rest of the run")
        self.centres.update(out.teacher_emb, out.labels)
        terms = horkd_terms(out.teacher_emb, out.student_emb, out.labels, self.centres.means())
        names = ("horkd_l1", "horkd_distance", "horkd_angle", "horkd_centre")
        return {n: w * t for n, w, t in zip(names, self.weights, terms, strict=True)}
