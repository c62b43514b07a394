"""Model registry: ``askd.models.create(name, variant="official", embedding_size=512, **kw)``.

Every model maps x (B,3,112,112) in [-1,1] to ``(embedding (B,E), maps)`` with one
``(channel_map (B,C), spatial_map (B,1,H,W))`` per CBAM block. The variant sets the CBAM of every block:
``official`` (authors' code: 3x3 spatial conv, pre-sigmoid maps) or ``paper`` (7x7, post-sigmoid maps).
The tables of names and shapes are in :mod:`askd.archs`.
"""

from __future__ import annotations

from .archs import ARCHS, VARIANTS, check_variant, names
from .nn.iresnet import IResNetCBAM

__all__ = ["check_variant", "create", "names"]


def create(name: str, variant: str = "official", embedding_size: int = 512, **kw) -> IResNetCBAM:
    """Build backbone ``name`` with the CBAM of ``variant``.

    Extra keywords go to :class:`askd.nn.IResNetCBAM` (``dropout``); ``reduction`` (default: the
    architecture's, 16 for the IR nets) and ``backend`` (see :class:`askd.nn.CBAM`) go to every CBAM.
    """
    if not isinstance(name, str) or name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; expected one of {names()}")
    if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    blocks, widths, reduction = ARCHS[name]
    cbam = dict(
        VARIANTS[check_variant(variant)], reduction=kw.pop("reduction", reduction), backend=kw.pop("backend", None)
    )
    return IResNetCBAM(blocks, widths, embedding_size=embedding_size, cbam=cbam, **kw)
