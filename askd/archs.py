"""The tables of the model registry: architecture names and shapes, CBAM variants.

Plain data without torch, so that ``askd.config``, ``askd.data`` and ``askd.losses`` can check ``arch`` and
``variant`` without loading the models (``askd.models`` imports the CBAM kernels and the compiled extension);
``askd.models`` builds from these tables.
"""

from __future__ import annotations

VARIANTS = {
    "official": {"spatial_kernel": 3, "maps": "logits"},
    "paper": {"spatial_kernel": 7, "maps": "sigmoid"},
}

# name -> (blocks per stage, stem + stage widths, CBAM reduction)
ARCHS = {
    "ir18_cbam": ((2, 2, 2, 2), (64, 64, 128, 256, 512), 16),
    "ir34_cbam": ((3, 4, 6, 3), (64, 64, 128, 256, 512), 16),
    "ir50_cbam": ((3, 4, 14, 3), (64, 64, 128, 256, 512), 16),
    "ir100_cbam": ((3, 13, 30, 3), (64, 64, 128, 256, 512), 16),
    # width-reduced (1/8), one block per stage: a CPU demo that trains in minutes. Reduction 2, because
    # 16 would leave the channel MLPs under two hidden units, which ReLU often kills for good.
    "ir_tiny_cbam": ((1, 1, 1, 1), (8, 8, 16, 32, 64), 2),
}


def check_variant(variant: str) -> str:
    """Return ``variant`` or raise a ValueError listing the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return variant


def names() -> list[str]:
    """The model names :func:`askd.models.create` accepts."""
    return sorted(ARCHS)
