"""A-SKD attention distillation loss (Shin et al., ECCV 2022), the plain-PyTorch reference.

Maps come as one ``(channel_map (B,C), spatial_map (B,1,H,W))`` tuple per CBAM block. Per map,
with t, s flattened to (B, D):

    cos_b = dot(t_b, s_b) / max(|t_b| * |s_b|, eps),  eps = 1e-8  (torch.nn.functional.cosine_similarity)
    rho   = mean_b(1 - cos_b)

    official (authors' code):  L = weight * sum over all 2N maps of rho
    paper (eq. 5-6):           L = weight * sum over N blocks of (rho_channel + rho_spatial) / 2

``kinds`` picks which of each block's maps are distilled (the paper's Table 3 ablation: ``("spatial",)``,
``("channel",)``); the paper variant then averages over the kinds kept (one kind: weight * sum of its rho).
Methods ``askd``, ``askd_sa`` and ``askd_ca`` (weight: config key ``distill_weight``, 5).

Teacher maps are detached: only the student gets gradients. ``backend`` (:mod:`askd.backend`) picks this
reference (``"torch"``) or the fused op :func:`askd.ops.cosine_distill` (``"triton"``, ``"ext"``; one call
over all maps), ``"auto"`` the fastest available; None means ``$ASKD_BACKEND`` or ``"torch"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backend as backends
from ..archs import check_variant
from ..nn.cbam import KINDS, MapPair, check_map_pairs
from ..ops.cosine_distill import cosine_distill, cosine_distill_ref, promoted
from .registry import Method, Outputs, register


def attention_distill_loss(
    teacher_maps: Sequence[MapPair],
    student_maps: Sequence[MapPair],
    variant: str = "official",
    weight: float = 5.0,
    backend: str | None = None,
    kinds: Sequence[str] = KINDS,
) -> torch.Tensor:
    """The A-SKD loss over all blocks and the ``kinds`` of maps asked for, a scalar (fp32, or fp64 for fp64 maps).

    Every backend raises a ValueError for an empty batch (B = 0): the mean over no samples is undefined. A NaN in
    a sample's map makes its loss term and its whole gradient row NaN in every backend.
    """
    check_variant(variant)
    check_map_pairs(teacher_maps, student_maps)  # B = 0 too: a clear error in every backend, not NaN
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds: expected distinct names of {list(KINDS)}, got {list(kinds)}")
    keep = [KINDS.index(k) for k in kinds]
    per_map = weight / len(keep) if variant == "paper" else weight  # the paper averages a block's kinds
    name = backends.resolve_constant(backend, student_maps[0][0].device.type)
    # maps of several dtypes are cast to one in every backend: the fused ones need it, the formula follows
    teacher, student = promoted([pair[k] for pair in teacher_maps for k in keep],
                                [pair[k] for pair in student_maps for k in keep])
    if name == "torch":
        return cosine_distill_ref(teacher, student, per_map)
    return cosine_distill(teacher, student, per_map, name, checked=True)


@register
class ASKD(Method):
    """``attention_distill_loss`` of the run's variant, weight ``distill_weight``, with ``--fused`` kernels."""

    name = "askd"
    needs = frozenset({"teacher", "maps"})
    paper = "Shin et al., ECCV 2022 (A-SKD; gist-ailab/teaching-where-to-look)"
    kinds = KINDS

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        self.variant, self.weight, self.backend = cfg.variant, cfg.distill_weight, cfg.kernel_backend()

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        loss = attention_distill_loss(out.teacher_maps, out.student_maps, self.variant, self.weight, self.backend,
                                      self.kinds)
        return {self.name: loss}


@register
class ASKDSpatial(ASKD):
    name = "askd_sa"
    paper = "A-SKD on the spatial maps only (A-SKD Table 3)"
    kinds = ("spatial",)


@register
class ASKDChannel(ASKD):
    name = "askd_ca"
    paper = "A-SKD on the channel maps only (A-SKD Table 3)"
    kinds = ("channel",)
