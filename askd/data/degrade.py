"""Low-resolution synthesis: ``degrade(x, size, variant)``, batched, on x's device, same shape out.

x is a float batch (B,C,H,W) (normalised to [-1,1] in training; every step is linear or
order-preserving, so it commutes with that normalisation up to rounding). ``size`` is the LR side d.

official (authors' ``CASIAWebFace``): nearest down to d x d, nearest up to H x W, then a fixed 5x5
    Gaussian blur, sigma_x = 0.1, sigma_y = 2.0, reflect padding, depthwise.
paper (section 3.1): bicubic down to d x d (antialiased, as image-resize tools do), a 5x5 Gaussian blur
    with sigma = 0.75 px at the low resolution (the paper gives none; ours is mild so that the 8x
    image of 14 px keeps its structure), reflect padding, bicubic up to H x W, clamped to each image's input range.
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


def degrade(x: torch.Tensor, size: int, variant: str = "official") -> torch.Tensor:
    """LR version of ``x`` (B,C,H,W) float, down to ``size`` px and back; returns (B,C,H,W) in x's dtype."""
    check_variant(variant)
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"degrade expects a float batch (B,C,H,W), got {tuple(x.shape)} {x.dtype}")
    h, w = x.shape[-2:]
    if not 2 < size <= min(h, w):
        raise ValueError(f"degrade: LR size must be in (2, {min(h, w)}], got {size}")
    if variant == "official":
        low_res = F.interpolate(x, size=(size, size), mode="nearest")
        up = F.interpolate(low_res, size=(h, w), mode="nearest")
        return gaussian_blur(up, OFFICIAL_SIGMA)
    low_res = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    low_res = gaussian_blur(low_res, PAPER_SIGMA)
    up = F.interpolate(low_res, size=(h, w), mode="bicubic", align_corners=False)
    # bicubic overshoots; keep each image inside its own input range
    return up.clamp(x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True))
