"""The fine per-identity marks (moles, freckles, a stripe patch, a binary "birthmark" code): drawn with the
identity's traits (``_marks``) and baked into a detail texture (B,1,T,T) over face coordinates (``_textures``),
which the rasteriser samples on the face so that the marks move with it.
"""

from __future__ import annotations

import math

import torch

from .raster import Params
from .sampling import Draws

TEXTURE = 96  # detail texture side in texels over face coordinates [-1, 1]^2: ~1.2 px per texel at 112 px
MOLES = 5  # most moles per identity


def _marks(d: Draws, p: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw an identity's fine marks; scalars go into ``p`` (positions in face units).

    Returns the birthmark code's opacity (6, 6) and the flat texel indices of the freckles (n,).
    """
    a, b, g = p["a"], p["b"], d.generator
    # a patch of fine stripes (wrinkles / scar texture) at an identity-specific place, angle and period
    cu, cv, r = d.uniform(-0.35, 0.35) * a, d.uniform(-0.5, 0.45) * b, d.uniform(0.08, 0.15)
    angle, period = d.uniform(0.0, math.pi), d.uniform(0.045, 0.07)
    p["st_u"], p["st_v"] = math.cos(angle) / period, math.sin(angle) / period
    p["st_0"] = -(cu * p["st_u"] + cv * p["st_v"])
    p["st_cu"], p["st_cv"], p["st_ir"] = cu, cv, 1 / r
    # 1 to MOLES moles, radius ~1-1.7 px; absent ones get radius 0
    count = 1 + int(d.uniform(0, MOLES - 0.01))
    for j in range(MOLES):
        rho, phi = 0.8 * math.sqrt(d.uniform()), d.uniform(0, 2 * math.pi)
        p[f"mole{j}_u"], p[f"mole{j}_v"] = rho * a * math.cos(phi), rho * b * math.sin(phi)
        p[f"mole{j}_r"] = d.uniform(0.018, 0.03) if j < count else 0.0
    # a 6 x 6 texel random binary code ("birthmark", ~7 px), on a cheek or the forehead
    p["code_row"] = float(int((d.uniform(-0.45, 0.3) * b + 1) * TEXTURE / 2))
    p["code_col"] = float(int((d.pick((-1, 1)) * d.uniform(0.2, 0.35) * a + 1) * TEXTURE / 2) - 3)
    code = 0.45 * (torch.rand(6, 6, generator=g) < 0.5)
    # freckles: 0-40 single texels over nose and cheeks (|u| < 0.45, -0.12 < v < 0.28)
    n = max(0, int(d.uniform(-15, 40)))
    rows = torch.randint(int(TEXTURE * 0.44), int(TEXTURE * 0.64), (n,), generator=g)
    cols = torch.randint(int(TEXTURE * 0.275), int(TEXTURE * 0.725), (n,), generator=g)
    return code, rows * TEXTURE + cols


def _stamp(cu: torch.Tensor, cv: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texel grid of (2 half + 1)^2 around the texel holding (cu, cv), (B,...,1,1) face units each.

    Returns face coordinates u (...,1,W), v (...,H,1) of the texel centres and flat texel indices (...,H,W).
    """
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    cols = ((cu + 1) * (TEXTURE / 2)).floor_() + offsets
    rows = ((cv + 1) * (TEXTURE / 2)).floor_() + offsets[:, None]
    index = rows.clamp(0, TEXTURE - 1) * TEXTURE + cols.clamp(0, TEXTURE - 1)
    return (cols + 0.5) * (2 / TEXTURE) - 1, (rows + 0.5) * (2 / TEXTURE) - 1, index.long()


def _textures(p: Params, marks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Fine-mark opacity (B,1,T,T) in [0, 1] over face coordinates [-1, 1]^2 (T = TEXTURE).

    Every mark is a small stamp of texels; stamps are merged by a max (scatter amax, order-free).
    """
    # stripes: a square wave of period 2-3.5 texels inside a round patch (radius <= 0.15 = 7.2 texels)
    u, v, stripe_index = _stamp(p["st_cu"], p["st_cv"], 8)
    phase = u * p["st_u"] + (v * p["st_v"] + p["st_0"])
    du, dv = (u - p["st_cu"]) * p["st_ir"], (v - p["st_cv"]) * p["st_ir"]
    patch = torch.sub(1, du * du + dv * dv).clamp_(min=0).sqrt_()
    stripes = patch.mul_((phase - phase.floor()) < 0.5).mul_(0.35)
    # moles: discs of radius <= 1.5 texels plus a half-texel soft edge
    mu = torch.cat([p[f"mole{j}_u"] for j in range(MOLES)], dim=1)[..., None]  # (B,M,1,1)
    mv = torch.cat([p[f"mole{j}_v"] for j in range(MOLES)], dim=1)[..., None]
    mr = torch.cat([p[f"mole{j}_r"] for j in range(MOLES)], dim=1)[..., None]
    u, v, mole_index = _stamp(mu, mv, 2)
    du, dv = u - mu, v - mv
    moles = torch.sub(mr, (du * du + dv * dv).sqrt_()).mul_(TEXTURE / 2).add_(0.5).clamp_(0, 1).mul_(0.85)
    # the code at its place and the freckles (padded with index 0, opacity 0)
    cells = torch.arange(6)
    code_index = (p["code_row"].long() + cells[:, None]) * TEXTURE + p["code_col"].long() + cells  # (B,6,6)
    codes = torch.stack([code for code, _ in marks])
    freckles = torch.nn.utils.rnn.pad_sequence([f for _, f in marks], batch_first=True)
    dots = torch.nn.utils.rnn.pad_sequence([torch.full(f.shape, 0.4) for _, f in marks], batch_first=True)
    b = len(marks)
    index = torch.cat([x.reshape(b, -1) for x in (stripe_index, mole_index, code_index, freckles)], dim=1)
    value = torch.cat([x.reshape(b, -1) for x in (stripes, moles, codes, dots)], dim=1)
    out = torch.zeros(b, TEXTURE * TEXTURE).scatter_reduce_(1, index, value, reduce="amax")
    return out.view(b, 1, TEXTURE, TEXTURE)
