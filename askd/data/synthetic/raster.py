"""Rasteriser: a chunk of float images (B,3,S,S) drawn from per-image coefficients (``_draw``), each group
of shapes on its pixel window only, with exactly rounded element-wise arithmetic (see the package docstring).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# RGB in [0, 1]
MARK = (0.30, 0.17, 0.10)  # moles, freckles, stripes: dark brown
WHITE = (0.96, 0.96, 0.94)
DARK = (0.06, 0.04, 0.04)
MOUTH_INSIDE = (0.30, 0.06, 0.08)


@functools.lru_cache(maxsize=8)
def pixel_centres(n: int) -> torch.Tensor:
    """Pixel-centre coordinates of n pixels across [-1, 1], (n,); shared, never written to."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) * (2.0 / n) - 1.0


class Params:
    """Per-image scalars as (B,1,1) tensors by name, RGB triples as (B,3,1,1) by prefix."""

    def __init__(self, rows: list[dict[str, float]]):
        self.index = {n: i for i, n in enumerate(rows[0])}
        table = torch.tensor([list(r.values()) for r in rows], dtype=torch.float32)
        self._columns = table.t().contiguous()[:, :, None, None]  # (P,B,1,1)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._columns[self.index[name]]

    def rgb(self, name: str) -> torch.Tensor:
        i = self.index[name + "_r"]
        return self._columns[i:i + 3].transpose(0, 1)


class _Grid:
    """Face coordinates (u, v) of the pixel centres in ``rows`` x ``cols`` of the image, one pose per image.

    u = ur + uc and v = vr + vc with ur, vr (B,1,W) and uc, vc (B,H,1): an ellipse axis in plain face
    coordinates then costs one plane operation; the planes u, v, |u| (B,H,W) are built on first use.
    """

    def __init__(self, p: Params, size: int, rows: slice, cols: slice):
        t = pixel_centres(size)
        x, y = t[cols][None, None, :] - p["tx"], t[rows][None, :, None] - p["ty"]
        self.ur, self.uc = x * p["cos"], y * p["sin"]
        self.vr, self.vc = x * p["nsin"], y * p["cos"]
        self.p = p

    @functools.cached_property
    def u(self) -> torch.Tensor:
        return self.ur + self.uc

    @functools.cached_property
    def v(self) -> torch.Tensor:
        return self.vr + self.vc

    @functools.cached_property
    def au(self) -> torch.Tensor:
        return self.u.abs()  # left/right features are drawn once, mirrored

    def ellipse(self, name: str, u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """Coverage (B,H,W) in [0, 1] of the ellipse ``name`` (see geometry._ellipse_coefs), ~1 px soft edge.

        ``u``/``v`` (B,H,W) replace the plain face coordinates (mirrored, bent or tilted shapes).
        """
        p = self.p
        qx = _axis(self.ur, self.uc, u, p[name + "_cx"], p[name + "_sx"])
        qy = _axis(self.vr, self.vc, v, p[name + "_cy"], p[name + "_sy"])
        return torch.sub(p[name + "_c"], qx.mul_(qx).add_(qy.mul_(qy))).clamp_(0, 1)

    def bump(self, name: str, u: torch.Tensor | None = None) -> torch.Tensor:
        """Smooth bump (1 - d^2/r^2)^2 inside radius r, 0 outside, (B,H,W): a gaussian-like blob."""
        p = self.p
        qx = _axis(self.ur, self.uc, u, p[name + "_cx"], p[name + "_ir"])
        qy = _axis(self.vr, self.vc, None, p[name + "_cy"], p[name + "_ir"])
        t = torch.sub(1, qx.mul_(qx).add_(qy.mul_(qy))).clamp_(min=0)
        return t.mul_(t)

    def face(self) -> torch.Tensor:
        """Face coverage (B,H,W): an ellipse narrowing from 1 at the eyes to p["jaw"] at the chin."""
        low = (self.v * self.p["inv_b"]).clamp_(0, 1)
        return self.ellipse("face", u=self.u / low.mul_(low).mul_(self.p["jaw_m1"]).add_(1))


def _axis(row: torch.Tensor, col: torch.Tensor, plane: torch.Tensor | None, centre, scale) -> torch.Tensor:
    """(coordinate - centre) * scale as a plane (B,H,W), from row + col vectors unless a plane is given."""
    if plane is None:
        return (row - centre).mul_(scale).add(col * scale)
    return (plane - centre).mul_(scale)


def paint(img: torch.Tensor, alpha: torch.Tensor, rgb) -> None:
    """img (B,3,H,W) += alpha (B,H,W) * (rgb (B,3,1,1) - img), in place.

    Where alpha is 0 a pixel keeps its exact bits, so leaving out pixels or layers whose opacity is 0 for
    every image of a chunk changes no result.
    """
    if not isinstance(rgb, torch.Tensor):
        rgb = torch.tensor(rgb).view(1, 3, 1, 1)
    img.add_((rgb - img).mul_(alpha.unsqueeze(1)))


def _draw(p: Params, texture: torch.Tensor | None, windows: dict[str, tuple[slice, slice]], size: int) -> torch.Tensor:
    """Float images (B,3,size,size) in about [0, 1]; textures (B,1,T,T) or None; ``windows`` from geometry._windows.

    Each group of shapes is drawn on its window only: a view of the image and a grid of the same pixels.
    """
    y = pixel_centres(size)[None, :, None]
    img = (p.rgb("bg_step") * ((y + 1) * 0.5)).add_(p.rgb("bg")).expand(-1, -1, -1, size).contiguous()

    def region(group: str) -> tuple[torch.Tensor, _Grid]:
        rows, cols = windows[group]
        return img[:, :, rows, cols], _Grid(p, size, rows, cols)

    view, g = region("shirt")
    paint(view, g.ellipse("shirt"), p.rgb("shirt"))
    view, g = region("neck")
    paint(view, g.ellipse("neck"), p.rgb("neck"))
    if p["hair_on"].any():
        view, g = region("back")
        paint(view, g.ellipse("back").mul_(p["hair_on"]), p.rgb("hair"))
    view, g = region("ears")
    paint(view, g.ellipse("ear", u=g.au), p.rgb("ear"))
    view, g = region("face")
    face = g.face()
    paint(view, face, p.rgb("skin"))
    if texture is not None:  # the identity's fine marks, carried along with the face
        marks = F.grid_sample(texture, torch.stack((g.u, g.v), dim=-1), align_corners=False)[:, 0]
        paint(view, marks.mul_(face), MARK)
    if p["beard"].any():  # below a line under the nose that rises towards the sides
        edge = (g.u * g.u).mul_(0.8).add_(g.v).sub_(p["beard_v"]).mul_(p["inv_px"]).add_(0.5).clamp_(0, 1)
        paint(view, edge.mul_(face).mul_(p["beard"]), p.rgb("hair"))
    view, g = region("blush")
    paint(view, g.bump("blush", u=g.au).mul_(g.face()).mul_(p["blush_a"]), p.rgb("lip"))
    view, g = region("nose")
    paint(view, g.ellipse("nose").mul_(0.22), p.rgb("nose"))
    paint(view, g.ellipse("nostril", u=g.au).mul_(0.7), p.rgb("nostril"))
    _mouth(*region("mouth"), p)
    _eyes(*region("eyes"), p)
    if p["hair_on"].any():  # fringe: hair above a curved, possibly parted hairline, inside the head outline
        view, g = region("fringe")
        hairline = (g.u * g.u).mul_(p["hair_curve"]).add_((g.u * p["hair_part"]).clamp_(min=0)).add_(p["hairline_0"])
        fringe = hairline.sub_(g.v).mul_(p["inv_px"]).add_(0.5).clamp_(0, 1)
        paint(view, fringe.mul_(g.ellipse("head")).mul_(p["hair_on"]), p.rgb("hair"))
    light = (pixel_centres(size)[None, None, :] * p["light_x"]).add(y * p["light_y"]).add_(p["light"])
    return img.mul_(light.unsqueeze(1) * p.rgb("white"))


def _mouth(view: torch.Tensor, g: _Grid, p: Params) -> None:
    """Moustache, then lips bent by the smile, dark inside when open."""
    if p["moustache"].any():
        paint(view, g.ellipse("tache").mul_(p["moustache"]), p.rgb("hair"))
    bent = (g.u * g.u).mul_(p["bend"]).add_(g.v)
    paint(view, g.ellipse("lips", v=bent), p.rgb("lip"))
    if p["open_on"].any():
        paint(view, g.ellipse("inner", v=bent).mul_(p["open_on"]), MOUTH_INSIDE)


def _eyes(view: torch.Tensor, g: _Grid, p: Params) -> None:
    """Lid outline, white, iris and pupil (both eyes look the same way), brows, glasses."""
    paint(view, g.ellipse("lid", u=g.au), p.rgb("lid"))
    white = g.ellipse("white", u=g.au)
    paint(view, white, WHITE)
    iris_u = g.au - torch.sign(g.u).mul_(p["gaze"])
    paint(view, g.ellipse("iris", u=iris_u).mul_(white), p.rgb("iris"))
    paint(view, g.ellipse("pupil", u=iris_u).mul_(white), DARK)
    tilted = (g.au - p["eye_x"]).mul_(p["brow_tilt"]).add_(g.v)
    paint(view, g.ellipse("brow", u=g.au, v=tilted), p.rgb("brow"))
    if p["glasses"].any():
        rim = g.ellipse("rim_out", u=g.au).sub_(g.ellipse("rim_in", u=g.au))
        paint(view, torch.maximum(rim, g.ellipse("bridge")).mul_(p["glasses"]), p.rgb("frame"))

