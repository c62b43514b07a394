"""The tables of the model registry: architecture names and shapes, CBAM variants.

Two families: ``ARCHS``, the IR-ResNet face models (task ``face``: (B,3,112,112) -> embedding), and ``RESNETS``,
the ResNet-CBAM classifiers of the paper's section 5.1 (task ``classify``: images -> class logits).

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

# name -> (block, blocks per stage, stem + stage base widths, CBAM reduction): torchvision's ResNets with one
# CBAM per residual block. A "bottleneck" block's output has 4x its base width (stage outputs 256..2048).
RESNETS = {
    "resnet18_cbam": ("basic", (2, 2, 2, 2), (64, 64, 128, 256, 512), 16),
    "resnet34_cbam": ("basic", (3, 4, 6, 3), (64, 64, 128, 256, 512), 16),
    "resnet50_cbam": ("bottleneck", (3, 4, 6, 3), (64, 64, 128, 256, 512), 16),
    "resnet101_cbam": ("bottleneck", (3, 4, 23, 3), (64, 64, 128, 256, 512), 16),
    # width-reduced (1/4), one block per stage: a CPU demo. Reduction 4 keeps the stage-1 MLP at 4 hidden units.
    "resnet_tiny_cbam": ("basic", (1, 1, 1, 1), (16, 16, 32, 64, 128), 4),
}

# task -> its model names: face models map faces to embeddings, classify models images to class logits
TASK_ARCHS = {"face": sorted(ARCHS), "classify": sorted(RESNETS)}


def check_variant(variant: str) -> str:
    """Return ``variant`` or raise a ValueError listing the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return variant


def task_of(arch: str) -> str:
    """``"face"`` or ``"classify"``: the task model ``arch`` is built for; a ValueError for an unknown name."""
    for task, archs in TASK_ARCHS.items():
        if arch in archs:
            return task
    raise ValueError(f"unknown model {arch!r}; expected one of {names()}")


def names(task: str | None = None) -> list[str]:
    """The model names :func:`askd.models.create` accepts, sorted: all of them, or those of ``task``."""
    if task is None:
        return sorted(ARCHS.keys() | RESNETS.keys())
    if task not in TASK_ARCHS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_ARCHS)}")
    return list(TASK_ARCHS[task])
