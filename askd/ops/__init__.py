"""The fused ops: written-out references, backend contracts and the ``torch.library`` registrations.

``cbam`` and ``cosine_distill`` run a fused backend by name; ``askd.nn.CBAM(backend=...)`` and
``askd.losses.attention_distill_loss(backend=...)`` resolve the name (see :mod:`askd.backend`) and call them.
"""

from .cbam import cbam, cbam_backward_ref, cbam_forward_ref, cbam_ref
from .cosine_distill import cosine_distill, cosine_distill_backward_ref, cosine_distill_forward_ref, cosine_distill_ref

__all__ = [
    "cbam",
    "cbam_backward_ref",
    "cbam_forward_ref",
    "cbam_ref",
    "cosine_distill",
    "cosine_distill_backward_ref",
    "cosine_distill_forward_ref",
    "cosine_distill_ref",
]
