"""The input check every backbone shares: x is a batch of images (B,3,H,W) that the model can run.

A wrong input should fail at the model's door with what it expects, not deep inside a convolution with
PyTorch's message about weights, or not at all (uint8 images run through a float model under autocast).
"""

from __future__ import annotations

import torch


def check_images(x: object, weight: torch.Tensor, *, side: int | None = None, min_side: int = 1, why: str = "") -> None:
    """Raise unless x is a floating (B,3,H,W) tensor of ``weight``'s dtype (or any floating dtype under autocast).

    ``side``: H = W = side exactly; else H, W >= ``min_side``, ``why`` saying what sets that bound. A TypeError
    for a non-tensor, a ValueError starting "expected input" otherwise.
    """
    expected = f"(B,3,{side},{side})" if side is not None else f"(B,3,H,W) with H, W >= {min_side}{why}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected input a tensor {expected}, got {type(x).__name__}")
    if side is not None:
        fits = x.dim() == 4 and tuple(x.shape[1:]) == (3, side, side)
    else:
        fits = x.dim() == 4 and x.shape[1] == 3 and min(x.shape[2:]) >= min_side
    if not fits:
        raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected input floating point, got {x.dtype} (normalised images, e.g. askd.train.to_input)")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"expected input of the model's dtype {weight.dtype}, got {x.dtype} (or use autocast)")
