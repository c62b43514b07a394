"""Model registry: ``askd.models.create(name, variant="official", embedding_size=512, *, num_classes=None, ...)``.

Two families (the tables of names and shapes are in :mod:`askd.archs`):

- face (``ir*_cbam``): x (B,3,112,112) in [-1,1] -> ``(embedding (B,E), maps)``, :class:`askd.nn.IResNetCBAM`.
- classify (``resnet*_cbam``): x (B,3,H,W) -> ``(logits (B,num_classes), maps)``, :class:`askd.nn.ResNetCBAM`
  with an ImageNet (H, W >= 32) or CIFAR (H, W >= 8) stem.

``maps`` holds one ``(channel_map (B,C), spatial_map (B,1,H,W))`` per CBAM block. The variant sets the CBAM of
every block: ``official`` (authors' code: pre-sigmoid maps, 3x3 spatial conv) or ``paper`` (post-sigmoid maps,
7x7). The ResNets keep Woo et al.'s 7x7 spatial conv in both variants; only the kind of map follows the variant.
"""

from __future__ import annotations

from torch import nn

from .archs import ARCHS, RESNETS, VARIANTS, check_variant, names, task_of
from .nn.iresnet import IResNetCBAM
from .nn.resnet import ResNetCBAM

__all__ = ["check_variant", "create", "names", "task_of"]


def create(
    name: str,
    variant: str = "official",
    embedding_size: int = 512,
    *,
    num_classes: int | None = None,
    stem: str | None = None,
    **kw,
) -> nn.Module:
    """Build backbone ``name`` with the CBAM of ``variant``.

    Face nets (:class:`askd.nn.IResNetCBAM`): extra keywords go to the model (``dropout``); ``num_classes`` and
    ``stem`` are refused. ResNets (:class:`askd.nn.ResNetCBAM`): ``num_classes`` is required, ``stem`` is
    ``"imagenet"`` (default) or ``"cifar"``, extra keywords go to the model (``zero_init_residual``);
    ``embedding_size`` is checked but unused (their features have the last stage's width). For both,
    ``reduction`` (default: the architecture's) and ``backend`` (see :class:`askd.nn.CBAM`) go to every CBAM.
    """
    if not isinstance(name, str) or name not in names():
        raise ValueError(f"unknown model {name!r}; expected one of {names()}")
    if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    if task_of(name) == "face":
        for key, value in (("num_classes", num_classes), ("stem", stem)):
            if value is not None:
                raise ValueError(f"{key} is for the ResNet classifiers {names('classify')}; {name} is a face model")
        blocks, widths, reduction = ARCHS[name]
        cbam = dict(
            VARIANTS[check_variant(variant)], reduction=kw.pop("reduction", reduction), backend=kw.pop("backend", None)
        )
        return IResNetCBAM(blocks, widths, embedding_size=embedding_size, cbam=cbam, **kw)
    block, blocks, widths, reduction = RESNETS[name]
    # Woo et al.'s 7x7 spatial conv in both variants (the 3x3 of ``official`` is the A-SKD face code's); the
    # variant picks the kind of map
    cbam = dict(
        spatial_kernel=7,
        maps=VARIANTS[check_variant(variant)]["maps"],
        reduction=kw.pop("reduction", reduction),
        backend=kw.pop("backend", None),
    )
    # ResNetCBAM checks num_classes (a missing one too) and stem
    return ResNetCBAM(block, blocks, widths, num_classes, stem="imagenet" if stem is None else stem, cbam=cbam, **kw)
