"""The fused ops: written-out references, backend contracts and the ``torch.library`` registrations.

``askd.ops.cbam`` (the function ``cbam``, its references ``cbam_ref``, ``cbam_forward_ref``,
``cbam_backward_ref``) and ``askd.ops.cosine_distill`` (``cosine_distill`` and its references) run a fused
backend by name; ``askd.nn.CBAM(backend=...)`` and ``askd.losses.attention_distill_loss(backend=...)`` resolve
the name (see :mod:`askd.backend`) and call them. ``askd.ops.prelu`` (``prelu`` and its references) is PReLU with
a one-pass compiled backward, which :class:`askd.nn.prelu.PReLU` runs for backend ``ext``.
"""

from . import cbam, cosine_distill, prelu

__all__ = ["cbam", "cosine_distill", "prelu"]
