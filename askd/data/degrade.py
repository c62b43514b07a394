"""Low-resolution synthesis: ``degrade(x, size, variant)``, batched, on x's device, same shape out.

x is a float batch (B,C,H,W) (normalised to [-1,1] in training; every step is linear or
order-preserving, so it commutes with that normalisation up to rounding). ``size`` is the LR side d.

official (authors' ``CASIAWebFace``): nearest down to d x d, nearest up to H x W, then a fixed 5x5
    Gaussian blur, sigma_x = 0.1, sigma_y = 2.0, reflect padding, depthwise.
paper (section 3.1): bicubic down to d x d (antialiased, as image-resize tools do), a 5x5 Gaussian blur
    with sigma = 0.75 px at the low resolution (the paper gives none; ours is mild so that the 8x
    image of 14 px keeps its structure), reflect padding, bicubic up to H x W, clamped to each image's input range.

``bicubic(x, size)`` is the LR synthesis of image classification (``--task classify``): the paper path without
the blur.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..archs import check_variant

OFFICIAL_SIGMA = (0.1, 2.0)  # (x, y), as the authors' gaussian_blur(kernel_size=[5, 5], sigma=[0.1, 2.0])
PAPER_SIGMA = (0.75, 0.75)
KERNEL_SIZE = 5


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """Normalised taps exp(-x^2 / (2 sigma^2)) at x = -(size-1)/2 .. (size-1)/2, fp64, (size,)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


@functools.lru_cache(maxsize=8)
def _kernel2d(size: int, sigma_x: float, sigma_y: float) -> torch.Tensor:
    return torch.outer(gaussian_kernel1d(size, sigma_y), gaussian_kernel1d(size, sigma_x))  # (ky, kx)


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float], size: int = KERNEL_SIZE) -> torch.Tensor:
    """Depthwise size x size Gaussian blur with reflect padding; sigma = (sigma_x, sigma_y). (B,C,H,W)."""
    c = x.shape[1]
    k = _kernel2d(size, float(sigma[0]), float(sigma[1])).to(x.device, x.dtype)
    p = size // 2
    return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), k.expand(c, 1, size, size), groups=c)


def low_res_size(scale: int, size: int = 112) -> int:
    """The LR side for a down-sampling ``scale`` (2, 4 or 8): 112 -> 56, 28, 14."""
    if scale not in (2, 4, 8):
        raise ValueError(f"scale must be 2, 4 or 8, got {scale}")
    return size // scale


def check_batch(x: torch.Tensor, size: int, name: str) -> None:
    """x a float batch (B,C,H,W) and 2 < size <= min(H, W), or a ValueError naming ``name``."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} expects a float batch (B,C,H,W), got {tuple(x.shape)} {x.dtype}")
    if not 2 < size <= min(x.shape[-2:]):
        raise ValueError(f"{name}: LR size must be in (2, {min(x.shape[-2:])}], got {size}")


def bicubic_down(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,size,size), antialiased as image-resize tools do."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def bicubic_up(low_res: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``low_res`` back to ``like``'s size; bicubic overshoots, so each image is kept inside ``like``'s range."""
    up = F.interpolate(low_res, size=tuple(like.shape[-2:]), mode="bicubic", align_corners=False)
    return up.clamp(like.amin(dim=(1, 2, 3), keepdim=True), like.amax(dim=(1, 2, 3), keepdim=True))


def bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """LR version of ``x`` (B,C,H,W) float for image classification: bicubic down to ``size`` px (antialiased)
    and bicubic up again, no blur (the common LR classification set-up, e.g. the A-SKD paper's 4x ImageNet and
    HORKD's 16 px CIFAR-100); (B,C,H,W) in x's dtype."""
    check_batch(x, size, "bicubic")
    return bicubic_up(bicubic_down(x, size), x)


def degrade(x: torch.Tensor, size: int, variant: str = "official") -> torch.Tensor:
    """LR version of ``x`` (B,C,H,W) float, down to ``size`` px and back; returns (B,C,H,W) in x's dtype."""
    check_variant(variant)
    check_batch(x, size, "degrade")
    if variant == "official":
        low_res = F.interpolate(x, size=(size, size), mode="nearest")
        up = F.interpolate(low_res, size=tuple(x.shape[-2:]), mode="nearest")
        return gaussian_blur(up, OFFICIAL_SIGMA)
    return bicubic_up(gaussian_blur(bicubic_down(x, size), PAPER_SIGMA), x)
