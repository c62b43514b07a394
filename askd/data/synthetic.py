"""Embedded procedural face generator: ``SyntheticFaces``, the default training data (nothing is downloaded).

Shapes: an item is ``(image, label)`` with image uint8 (3, size, size) RGB and label an int in
[0, num_identities); ``render`` returns uint8 (B, 3, size, size). Item ``i`` is identity
``i // samples_per_identity``, sample ``i % samples_per_identity``.

An identity is a cartoon face drawn on a coordinate grid from soft-edged ellipses and bumps:
  coarse cues (survive 8x down-sampling): face shape (axes, jaw), skin tone, hair colour and style
      (volume, length, hairline, parting, baldness), ears, eye spacing/size/iris colour, brows, nose,
      mouth and lip colour, glasses, beard/moustache, blush. Continuous traits spread over the middle
      COARSE fraction of their ranges: the knob that sets how hard the 8x task is;
  fine cues (1-4 px structure, lost at 14 px): moles, freckles, a patch of fine stripes (period 2-3.5 px) and a
      small random binary "birthmark" code, baked into a per-identity detail texture that moves with the
      face.
Each image adds jitter: pose (translation, in-plane rotation, scale), expression (smile, open mouth,
eye openness, gaze), glasses on or off, lighting (brightness, directional gradient, white balance),
background, shirt, gaussian noise.

Determinism: identity parameters come from a torch.Generator seeded by a hash of (seed, split, identity),
per-image jitter and noise from one seeded by (seed, split, identity, sample); the ``train`` and ``eval``
splits hash differently, so they hold disjoint random identities. Batched drawing uses exactly rounded
element-wise arithmetic (+ - * / sqrt min max abs floor), per-pixel grid_sample and an order-free scatter
max, never exp/sin/sigmoid, whose SIMD and scalar code paths may differ in the last bit; so an image's bits
do not depend on the batch it is rendered in, on call order or on the thread count. ``__getitem__`` calls
``render``.

Speed (measured with torch.set_num_threads(1) on a 2-core CPU shared with other jobs): ``render`` of 64
images at 112x112 takes 95-130 ms; ``__getitem__`` 3-6 ms per image. ``render`` draws single-threaded
(see _one_thread), in chunks of CHUNK images, each group of shapes only on the pixels it can touch.

Learnability (a 4-stage CNN, ~2 min on 2 cores, 100 train identities x 20 images, verification on 50 held-out
``eval`` identities): 98% at 112 px, 96% at 112 px without the fine marks, 89% trained and tested at 14 px
(``degrade(x, 14)``).

``python -m askd.data.synthetic OUT.png`` saves a grid of 8 identities x 6 samples to look at.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "eval")
TEXTURE = 96  # detail texture side in texels over face coordinates [-1, 1]^2: ~1.2 px per texel at 112 px
CHUNK = 16  # images drawn together: amortises per-operation overhead, planes still fit in cache
MOLES = 5  # most moles per identity
# how much of each coarse trait's range identities spread over: the knob for how hard the 8x task is
COARSE = 0.3

# pose jitter in image coordinates ([-1, 1] across the image, y down)
MAX_ANGLE = 9.0  # degrees
SCALE = (0.92, 1.08)
SHIFT_X = 0.06
SHIFT_Y = (-0.01, 0.09)

# RGB in [0, 1]
SKIN = ((0.97, 0.85, 0.75), (0.92, 0.75, 0.61), (0.81, 0.61, 0.46), (0.63, 0.44, 0.31), (0.42, 0.28, 0.19))
HAIR = ((0.09, 0.07, 0.07), (0.25, 0.16, 0.10), (0.45, 0.30, 0.17), (0.62, 0.27, 0.11), (0.86, 0.72, 0.44),
        (0.68, 0.68, 0.68))
IRIS = ((0.33, 0.19, 0.09), (0.50, 0.40, 0.18), (0.28, 0.52, 0.30), (0.25, 0.48, 0.78), (0.50, 0.56, 0.62),
        (0.13, 0.09, 0.07))
HAIR_MEAN = tuple(sum(c) / len(HAIR) for c in zip(*HAIR, strict=True))
FRAMES = ((0.08, 0.08, 0.08), (0.55, 0.10, 0.10), (0.10, 0.15, 0.45), (0.72, 0.60, 0.28))
LIP_RED = (0.74, 0.28, 0.30)
MARK = (0.30, 0.17, 0.10)  # moles, freckles, stripes: dark brown
WHITE = (0.96, 0.96, 0.94)
DARK = (0.06, 0.04, 0.04)
MOUTH_INSIDE = (0.30, 0.06, 0.08)


def _seed(*key) -> int:
    """A 63-bit seed from a stable hash of ``key`` (Python's hash() is salted per process)."""
    text = "/".join(str(k) for k in ("askd-synthetic", *key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class _Draws:
    """Uniform numbers from one seeded torch.Generator: a block of scalars consumed in order, then tensors."""

    def __init__(self, *key, n: int = 96):
        self.generator = torch.Generator().manual_seed(_seed(*key))
        self._u = iter(torch.rand(n, generator=self.generator, dtype=torch.float64).tolist())

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * next(self._u)

    def coarse(self, lo: float, hi: float) -> float:
        """A coarse identity trait: uniform over the middle COARSE fraction of [lo, hi]."""
        return (lo + hi) / 2 + (hi - lo) * COARSE * (next(self._u) - 0.5)

    def chance(self, p: float) -> bool:
        return next(self._u) < p

    def pick(self, options: tuple):
        return options[min(int(next(self._u) * len(options)), len(options) - 1)]


def _mix(a, b, t: float) -> tuple[float, float, float]:
    return tuple(x + (y - x) * t for x, y in zip(a, b, strict=True))


def _palette(colours: tuple, t: float) -> tuple[float, float, float]:
    """Piecewise-linear colour along ``colours`` at t in [0, 1]."""
    pos = t * (len(colours) - 1)
    i = min(int(pos), len(colours) - 2)
    return _mix(colours[i], colours[i + 1], pos - i)


def _shade(rgb, k: float) -> tuple[float, float, float]:
    return tuple(min(1.0, c * k) for c in rgb)


def _put(p: dict, name: str, rgb) -> None:
    p[name + "_r"], p[name + "_g"], p[name + "_b"] = rgb


def _identity(d: _Draws) -> dict[str, float]:
    """Scalar identity parameters (face units: the face is ~[-0.6, 0.6] x [-0.75, 0.75], v points down)."""
    p = {"a": d.coarse(0.50, 0.63), "b": d.coarse(0.68, 0.80), "jaw": d.coarse(0.62, 0.98)}
    skin = _palette(SKIN, d.coarse(0.0, 1.0))
    hair = _mix(HAIR_MEAN, _shade(d.pick(HAIR), d.uniform(0.8, 1.2)), COARSE)
    _put(p, "skin", skin)
    _put(p, "hair", hair)
    _put(p, "brow", _shade(hair, 0.55 if sum(hair) > 1.2 else 0.85))
    _put(p, "lip", _mix(skin, LIP_RED, d.coarse(0.45, 0.85)))
    _put(p, "iris", d.pick(IRIS))
    bald = d.chance(0.08)
    p["hair_vol"] = d.coarse(0.03, 0.16)
    p["hair_len"] = d.coarse(-0.15, 0.85)  # bottom of the back hair, as a fraction of b
    p["hair_on"] = 0.0 if bald else 1.0
    p["hairline"] = d.coarse(-0.72, -0.40)  # fringe edge at u = 0, as a fraction of b
    p["hair_curve"] = d.coarse(-0.3, 0.6)
    p["hair_part"] = d.coarse(-0.35, 0.35)
    p["ear"] = d.coarse(0.8, 1.2)
    p["eye_x"], p["eye_y"] = d.coarse(0.20, 0.28), d.coarse(-0.14, -0.02)
    p["eye_w"], p["eye_h"] = d.coarse(0.085, 0.12), d.coarse(0.045, 0.07)
    p["iris_size"] = d.uniform(0.55, 0.8)  # of the eye height
    p["brow_gap"], p["brow_t"] = d.coarse(0.05, 0.11), d.coarse(0.014, 0.035)
    p["brow_w"], p["brow_tilt"] = d.coarse(0.09, 0.14), d.coarse(-0.3, 0.3)
    p["nose_len"], p["nose_w"] = d.coarse(0.12, 0.22), d.coarse(0.045, 0.08)
    p["mouth_y"], p["mouth_w"] = d.coarse(0.36, 0.48), d.coarse(0.13, 0.22)
    p["lip_t"], p["smile"] = d.coarse(0.026, 0.046), d.coarse(-0.2, 0.6)
    p["blush"] = d.coarse(0.0, 0.35)
    p["glasses"] = 1.0 if d.chance(0.15) else 0.0
    _put(p, "frame", d.pick(FRAMES))
    beard = d.uniform()
    p["beard"] = 0.85 if beard < 0.12 else 0.0
    p["moustache"] = 0.9 if beard < 0.22 else 0.0
    return p


def _jitter(d: _Draws, size: int) -> dict[str, float]:
    """Scalar per-image parameters: pose, expression, lighting, background, noise level."""
    angle = math.radians(d.uniform(-MAX_ANGLE, MAX_ANGLE))
    scale = d.uniform(*SCALE)
    p = {"tx": d.uniform(-SHIFT_X, SHIFT_X), "ty": d.uniform(*SHIFT_Y)}
    p["scale_cos"], p["scale_sin"] = scale * math.cos(angle), scale * math.sin(angle)  # face -> image
    p["cos"], p["sin"], p["nsin"] = math.cos(angle) / scale, math.sin(angle) / scale, -math.sin(angle) / scale
    p["px"] = 2.0 / (size * scale)  # one pixel in face units: the anti-aliasing width
    p["smile_j"] = d.uniform(-0.3, 0.5)
    p["open"] = d.uniform(0.2, 1.0) if d.chance(0.3) else 0.0
    p["eye_open"] = d.uniform(0.65, 1.1)
    p["gaze_x"], p["gaze_y"] = d.uniform(-0.3, 0.3), d.uniform(-0.15, 0.15)
    p["light"] = d.uniform(0.75, 1.2)
    _put(p, "white", (d.uniform(0.93, 1.07), d.uniform(0.93, 1.07), d.uniform(0.93, 1.07)))  # white balance
    p["glasses_on"] = float(d.chance(0.75))  # glasses are not always worn
    direction, strength = d.uniform(0.0, 2 * math.pi), d.uniform(0.0, 0.3)
    p["light_x"], p["light_y"] = strength * math.cos(direction), strength * math.sin(direction)
    bg = _mix((d.uniform(0.3, 0.85),) * 3, (d.uniform(), d.uniform(), d.uniform()), d.uniform(0.1, 0.5))
    _put(p, "bg", bg)
    _put(p, "bg2", _shade(bg, d.uniform(0.7, 1.1)))
    _put(p, "shirt", (d.uniform(0.1, 0.9), d.uniform(0.1, 0.9), d.uniform(0.1, 0.9)))
    p["noise"] = d.uniform(0.004, 0.02)
    return p


def _marks(d: _Draws, p: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
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


def _ellipse_coefs(p: dict[str, float], name: str, cx: float, cy: float, ax: float, ay: float) -> None:
    """Store what ``_Grid.ellipse`` needs for ((u-cx)/ax)^2 + ((v-cy)/ay)^2 <= 1: centre, scales, offset.

    With f that quadratic form and r = min(ax, ay), (1 - f) r / 2 is the distance inside near the edge along
    the short axis, so coverage = clamp(k + 1/2 - k f) with k = r / (2 px): one pixel wide across thin
    shapes (brows, lips), softer at their tips. k f = (sqrt(k) (u-cx) / ax)^2 + (sqrt(k) (v-cy) / ay)^2.
    """
    k = min(ax, ay) / (2 * p["px"])
    p[name + "_cx"], p[name + "_cy"] = cx, cy
    p[name + "_sx"], p[name + "_sy"], p[name + "_c"] = math.sqrt(k) / ax, math.sqrt(k) / ay, k + 0.5


def _box(p: dict[str, float], name: str, mirrored: bool = False, bend: float = 0.0, tilt: float = 0.0) -> list:
    """Face-coordinate box [u_lo, u_hi, v_lo, v_hi] outside which ellipse ``name`` has zero coverage.

    Coverage is 0 where (sx (u-cx))^2 + (sy (v-cy))^2 >= c. ``mirrored``: drawn at |u|; ``bend``: v shifted
    by -bend u^2 (lips); ``tilt``: v shifted by -tilt (|u| - cx) (brows).
    """
    root = math.sqrt(p[name + "_c"])
    du, dv = root / p[name + "_sx"], root / p[name + "_sy"]
    cx, cy = p[name + "_cx"], p[name + "_cy"]
    u_lo, u_hi = (-abs(cx) - du, abs(cx) + du) if mirrored else (cx - du, cx + du)
    u2 = max(u_lo * u_lo, u_hi * u_hi)
    return [u_lo, u_hi, cy - dv - max(bend, 0.0) * u2 - abs(tilt) * du, cy + dv + max(-bend, 0.0) * u2 + abs(tilt) * du]


def _union(*boxes: list) -> list:
    return [min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)]


def _layout(p: dict[str, float]) -> dict[str, list]:
    """Add to ``p`` the per-image coefficients of every shape and colour ``_draw`` uses (Python floats).

    Returns, per drawing group, the face-coordinate box [u_lo, u_hi, v_lo, v_hi] that holds all of its
    non-zero opacity (None: nothing to draw).
    """
    a, b, px, skin = p["a"], p["b"], p["px"], (p["skin_r"], p["skin_g"], p["skin_b"])
    _ellipse_coefs(p, "shirt", 0.0, b + 0.62, 0.95, 0.42)
    _ellipse_coefs(p, "neck", 0.0, b * 0.75, a * 0.4, b * 0.5)
    top, bottom = -b - p["hair_vol"], b * p["hair_len"]
    _ellipse_coefs(p, "back", 0.0, (top + bottom) / 2, a + p["hair_vol"] * 0.8, (bottom - top) / 2)
    _ellipse_coefs(p, "ear", a * 0.97, 0.02, 0.075 * p["ear"], 0.14 * p["ear"])
    _ellipse_coefs(p, "face", 0.0, 0.0, a, b)
    p["inv_b"], p["jaw_m1"], p["inv_px"] = 1 / b, p["jaw"] - 1, 1 / px
    p["blush_cx"], p["blush_cy"], p["blush_ir"], p["blush_a"] = a * 0.55, 0.2, 1 / 0.16, 0.35 * p["blush"]
    nose_y = p["eye_y"] + 0.06 + p["nose_len"] / 2
    nose_end = nose_y + p["nose_len"] / 2
    _ellipse_coefs(p, "nose", 0.0, nose_y, p["nose_w"], p["nose_len"] / 2)
    _ellipse_coefs(p, "nostril", p["nose_w"] * 0.55, nose_end, 0.022, 0.013)
    p["beard_v"] = nose_end + 0.08
    lip_h = p["lip_t"] * (1 + 1.5 * p["open"])
    _ellipse_coefs(p, "tache", 0.0, p["mouth_y"] - lip_h - 0.025, p["mouth_w"] * 0.95, 0.03)
    p["bend"] = (p["smile"] + p["smile_j"]) * 1.8  # corners rise with the smile (v points down)
    _ellipse_coefs(p, "lips", 0.0, p["mouth_y"], p["mouth_w"], lip_h)
    # a closed mouth gets a floor height (the shape would degenerate) and zero opacity
    _ellipse_coefs(p, "inner", 0.0, p["mouth_y"], p["mouth_w"] * 0.8, max(p["lip_t"] * 1.3 * p["open"], 0.01))
    p["open_on"] = float(p["open"] > 0)
    ex, ey, eye_h = p["eye_x"], p["eye_y"], p["eye_h"] * p["eye_open"]
    _ellipse_coefs(p, "lid", ex, ey, p["eye_w"] + 0.014, eye_h + 0.014)
    _ellipse_coefs(p, "white", ex, ey, p["eye_w"], eye_h)
    iris_r = p["eye_h"] * p["iris_size"]
    p["gaze"] = p["gaze_x"] * iris_r
    _ellipse_coefs(p, "iris", ex, ey + p["gaze_y"] * iris_r, iris_r, iris_r)
    _ellipse_coefs(p, "pupil", ex, ey + p["gaze_y"] * iris_r, iris_r * 0.45, iris_r * 0.45)
    _ellipse_coefs(p, "brow", ex, ey - p["eye_h"] - p["brow_gap"], p["brow_w"], p["brow_t"])
    rim_w, rim_h = p["eye_w"] + 0.05, p["eye_h"] + 0.05
    _ellipse_coefs(p, "rim_out", ex, ey, rim_w + 0.014, rim_h + 0.014)
    _ellipse_coefs(p, "rim_in", ex, ey, rim_w, rim_h)
    _ellipse_coefs(p, "bridge", 0.0, ey - 0.02, ex - rim_w + 0.01, 0.008)
    _ellipse_coefs(p, "head", 0.0, -0.02, a + 0.02, b + 0.04)
    p["hairline_0"] = b * p["hairline"]
    _put(p, "neck", _shade(skin, 0.82))
    _put(p, "ear", _shade(skin, 0.9))
    _put(p, "nose", _shade(skin, 0.7))
    _put(p, "nostril", _shade(skin, 0.35))
    _put(p, "lid", _shade((p["brow_r"], p["brow_g"], p["brow_b"]), 0.6))
    _put(p, "bg_step", (p["bg2_r"] - p["bg_r"], p["bg2_g"] - p["bg_g"], p["bg2_b"] - p["bg_b"]))
    p["light_x"], p["light_y"] = p["light_x"] * p["light"], p["light_y"] * p["light"]
    p["glasses"] *= p["glasses_on"]

    hair = p["hair_on"] > 0
    mouth = [_box(p, "lips", bend=p["bend"])]
    mouth += [_box(p, "inner", bend=p["bend"])] if p["open_on"] else []
    mouth += [_box(p, "tache")] if p["moustache"] else []
    eyes = [_box(p, "lid", True), _box(p, "white", True), _box(p, "brow", True, tilt=p["brow_tilt"])]
    eyes += [_box(p, "rim_out", True), _box(p, "bridge")] if p["glasses"] else []
    fringe = _box(p, "head")
    reach = max(-fringe[0], fringe[1])  # the hairline is highest (largest v) at the sides
    fringe[3] = min(fringe[3], p["hairline_0"] + max(p["hair_curve"], 0) * reach**2 + abs(p["hair_part"]) * reach + px)
    cx, cy, r = p["blush_cx"], p["blush_cy"], 1 / p["blush_ir"]
    return {
        "shirt": _box(p, "shirt"),
        "neck": _box(p, "neck"),
        "back": _box(p, "back") if hair else None,
        "ears": _box(p, "ear", True),
        "face": _box(p, "face"),  # also holds the marks and the beard, both masked by the face
        "blush": [-cx - r, cx + r, cy - r, cy + r],
        "nose": _union(_box(p, "nose"), _box(p, "nostril", True)),
        "mouth": _union(*mouth),
        "eyes": _union(*eyes),  # iris and pupil are masked by the white
        "fringe": fringe if hair else None,
    }


def _pixels(p: dict[str, float], box: list, size: int) -> tuple[int, int, int, int]:
    """Pixel rows [r0, r1) and columns [c0, c1) covering face-coordinate ``box`` in this image's pose."""
    c, s = p["scale_cos"], p["scale_sin"]
    corners = [(u, v) for u in box[:2] for v in box[2:]]
    xs = [p["tx"] + u * c - v * s for u, v in corners]
    ys = [p["ty"] + u * s + v * c for u, v in corners]

    def span(lo: float, hi: float) -> tuple[int, int]:  # pixel i has its centre at (i + 0.5) 2 / size - 1
        return max(0, math.floor((lo + 1) * size / 2 - 0.5) - 1), min(size, math.ceil((hi + 1) * size / 2 - 0.5) + 2)

    return *span(min(ys), max(ys)), *span(min(xs), max(xs))


def _windows(rows: list[dict], boxes: list[dict], size: int) -> dict[str, tuple[slice, slice]]:
    """Per drawing group, the rows and columns of the chunk's images where it can be non-zero (maybe empty)."""
    out = {}
    for group in boxes[0]:
        spans = [_pixels(p, b[group], size) for p, b in zip(rows, boxes, strict=True) if b[group] is not None]
        if not spans:
            out[group] = (slice(0, 0), slice(0, 0))
            continue
        r0, r1, c0, c1 = zip(*spans, strict=True)
        out[group] = (slice(min(r0), max(r1)), slice(min(c0), max(c1)))
    return out


@functools.lru_cache(maxsize=8)
def _centres(n: int) -> torch.Tensor:
    """Pixel-centre coordinates of n pixels across [-1, 1], (n,); shared, never written to."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) * (2.0 / n) - 1.0


class _Params:
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


def _stamp(cu: torch.Tensor, cv: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texel grid of (2 half + 1)^2 around the texel holding (cu, cv), (B,...,1,1) face units each.

    Returns face coordinates u (...,1,W), v (...,H,1) of the texel centres and flat texel indices (...,H,W).
    """
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    cols = ((cu + 1) * (TEXTURE / 2)).floor_() + offsets
    rows = ((cv + 1) * (TEXTURE / 2)).floor_() + offsets[:, None]
    index = rows.clamp(0, TEXTURE - 1) * TEXTURE + cols.clamp(0, TEXTURE - 1)
    return (cols + 0.5) * (2 / TEXTURE) - 1, (rows + 0.5) * (2 / TEXTURE) - 1, index.long()


def _textures(p: _Params, marks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
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


class _Grid:
    """Face coordinates (u, v) of the pixel centres in ``rows`` x ``cols`` of the image, one pose per image.

    u = ur + uc and v = vr + vc with ur, vr (B,1,W) and uc, vc (B,H,1): an ellipse axis in plain face
    coordinates then costs one plane operation; the planes u, v, |u| (B,H,W) are built on first use.
    """

    def __init__(self, p: _Params, size: int, rows: slice, cols: slice):
        t = _centres(size)
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
        """Coverage (B,H,W) in [0, 1] of the ellipse ``name`` (see _ellipse_coefs), ~1 px soft edge.

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


def _paint(img: torch.Tensor, alpha: torch.Tensor, rgb) -> None:
    """img (B,3,H,W) += alpha (B,H,W) * (rgb (B,3,1,1) - img), in place.

    Where alpha is 0 a pixel keeps its exact bits, so leaving out pixels or layers whose opacity is 0 for
    every image of a chunk changes no result.
    """
    if not isinstance(rgb, torch.Tensor):
        rgb = torch.tensor(rgb).view(1, 3, 1, 1)
    img.add_((rgb - img).mul_(alpha.unsqueeze(1)))


def _draw(p: _Params, texture: torch.Tensor | None, windows: dict[str, tuple[slice, slice]], size: int) -> torch.Tensor:
    """Float images (B,3,size,size) in about [0, 1]; textures (B,1,T,T) or None; ``windows`` from _windows.

    Each group of shapes is drawn on its window only: a view of the image and a grid of the same pixels.
    """
    y = _centres(size)[None, :, None]
    img = (p.rgb("bg_step") * ((y + 1) * 0.5)).add_(p.rgb("bg")).expand(-1, -1, -1, size).contiguous()

    def region(group: str) -> tuple[torch.Tensor, _Grid]:
        rows, cols = windows[group]
        return img[:, :, rows, cols], _Grid(p, size, rows, cols)

    view, g = region("shirt")
    _paint(view, g.ellipse("shirt"), p.rgb("shirt"))
    view, g = region("neck")
    _paint(view, g.ellipse("neck"), p.rgb("neck"))
    if p["hair_on"].any():
        view, g = region("back")
        _paint(view, g.ellipse("back").mul_(p["hair_on"]), p.rgb("hair"))
    view, g = region("ears")
    _paint(view, g.ellipse("ear", u=g.au), p.rgb("ear"))
    view, g = region("face")
    face = g.face()
    _paint(view, face, p.rgb("skin"))
    if texture is not None:  # the identity's fine marks, carried along with the face
        marks = F.grid_sample(texture, torch.stack((g.u, g.v), dim=-1), align_corners=False)[:, 0]
        _paint(view, marks.mul_(face), MARK)
    if p["beard"].any():  # below a line under the nose that rises towards the sides
        edge = (g.u * g.u).mul_(0.8).add_(g.v).sub_(p["beard_v"]).mul_(p["inv_px"]).add_(0.5).clamp_(0, 1)
        _paint(view, edge.mul_(face).mul_(p["beard"]), p.rgb("hair"))
    view, g = region("blush")
    _paint(view, g.bump("blush", u=g.au).mul_(g.face()).mul_(p["blush_a"]), p.rgb("lip"))
    view, g = region("nose")
    _paint(view, g.ellipse("nose").mul_(0.22), p.rgb("nose"))
    _paint(view, g.ellipse("nostril", u=g.au).mul_(0.7), p.rgb("nostril"))
    _mouth(*region("mouth"), p)
    _eyes(*region("eyes"), p)
    if p["hair_on"].any():  # fringe: hair above a curved, possibly parted hairline, inside the head outline
        view, g = region("fringe")
        hairline = (g.u * g.u).mul_(p["hair_curve"]).add_((g.u * p["hair_part"]).clamp_(min=0)).add_(p["hairline_0"])
        fringe = hairline.sub_(g.v).mul_(p["inv_px"]).add_(0.5).clamp_(0, 1)
        _paint(view, fringe.mul_(g.ellipse("head")).mul_(p["hair_on"]), p.rgb("hair"))
    light = (_centres(size)[None, None, :] * p["light_x"]).add(y * p["light_y"]).add_(p["light"])
    return img.mul_(light.unsqueeze(1) * p.rgb("white"))


def _mouth(view: torch.Tensor, g: _Grid, p: _Params) -> None:
    """Moustache, then lips bent by the smile, dark inside when open."""
    if p["moustache"].any():
        _paint(view, g.ellipse("tache").mul_(p["moustache"]), p.rgb("hair"))
    bent = (g.u * g.u).mul_(p["bend"]).add_(g.v)
    _paint(view, g.ellipse("lips", v=bent), p.rgb("lip"))
    if p["open_on"].any():
        _paint(view, g.ellipse("inner", v=bent).mul_(p["open_on"]), MOUTH_INSIDE)


def _eyes(view: torch.Tensor, g: _Grid, p: _Params) -> None:
    """Lid outline, white, iris and pupil (both eyes look the same way), brows, glasses."""
    _paint(view, g.ellipse("lid", u=g.au), p.rgb("lid"))
    white = g.ellipse("white", u=g.au)
    _paint(view, white, WHITE)
    iris_u = g.au - torch.sign(g.u).mul_(p["gaze"])
    _paint(view, g.ellipse("iris", u=iris_u).mul_(white), p.rgb("iris"))
    _paint(view, g.ellipse("pupil", u=iris_u).mul_(white), DARK)
    tilted = (g.au - p["eye_x"]).mul_(p["brow_tilt"]).add_(g.v)
    _paint(view, g.ellipse("brow", u=g.au, v=tilted), p.rgb("brow"))
    if p["glasses"].any():
        rim = g.ellipse("rim_out", u=g.au).sub_(g.ellipse("rim_in", u=g.au))
        _paint(view, torch.maximum(rim, g.ellipse("bridge")).mul_(p["glasses"]), p.rgb("frame"))


class SyntheticFaces(Dataset):
    """Procedural cartoon faces: ``num_identities * samples_per_identity`` items of (uint8 (3,S,S), label).

    Item i is identity i // samples_per_identity (its label) and sample i % samples_per_identity.
    """

    def __init__(self, num_identities: int = 100, samples_per_identity: int = 20, seed: int = 0,
                 split: str = "train", size: int = 112):
        if not isinstance(num_identities, int) or num_identities < 1:
            raise ValueError(f"num_identities must be a positive int, got {num_identities!r}")
        if not isinstance(samples_per_identity, int) or samples_per_identity < 1:
            raise ValueError(f"samples_per_identity must be a positive int, got {samples_per_identity!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.num_identities, self.samples_per_identity = num_identities, samples_per_identity
        self.seed, self.split, self.size = seed, split, size
        self.num_classes = num_identities

    def __len__(self) -> int:
        return self.num_identities * self.samples_per_identity

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        identity, sample = divmod(i % len(self), self.samples_per_identity)
        return self.render(torch.tensor([identity]), torch.tensor([sample]))[0], identity

    def render(self, identities: torch.Tensor, samples: torch.Tensor, detail: bool = True) -> torch.Tensor:
        """Images uint8 (B,3,size,size) for identity and sample indices, integer (B,) each.

        Sample indices beyond samples_per_identity are valid (fresh jitter). ``detail=False`` leaves out the
        fine per-identity marks and changes nothing else (for ablations and tests).
        """
        ids, sams = self._check_indices(identities, samples)
        out = torch.empty(len(ids), 3, self.size, self.size, dtype=torch.uint8)
        with _one_thread():
            for start in range(0, len(ids), CHUNK):
                stop = start + CHUNK
                out[start:stop] = self._render_chunk(ids[start:stop], sams[start:stop], detail)
        return out

    def _check_indices(self, identities, samples) -> tuple[list[int], list[int]]:
        identities, samples = torch.as_tensor(identities), torch.as_tensor(samples)
        if identities.dim() != 1 or identities.shape != samples.shape:
            raise ValueError(f"render expects identities and samples of one shape (B,), got "
                             f"{tuple(identities.shape)} and {tuple(samples.shape)}")
        if identities.is_floating_point() or samples.is_floating_point():
            raise ValueError(f"render expects integer indices, got {identities.dtype} and {samples.dtype}")
        ids, sams = identities.tolist(), samples.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.num_identities:
            raise ValueError(f"identities must be in [0, {self.num_identities}), got [{min(ids)}, {max(ids)}]")
        if sams and min(sams) < 0:
            raise ValueError(f"samples must be >= 0, got {min(sams)}")
        return ids, sams

    def _render_chunk(self, ids: list[int], sams: list[int], detail: bool) -> torch.Tensor:
        """uint8 (B,3,S,S) for up to CHUNK (identity, sample) pairs."""
        rows, boxes, marks, noise = [], [], [], []
        for identity, sample in zip(ids, sams, strict=True):
            draws = _Draws(self.seed, self.split, identity)
            p = _identity(draws)
            if detail:
                marks.append(_marks(draws, p))
            draws = _Draws(self.seed, self.split, identity, sample)
            p.update(_jitter(draws, self.size))
            boxes.append(_layout(p))
            rows.append(p)
            noise.append(torch.randn(self.size, self.size, generator=draws.generator))  # grey sensor noise
        windows = _windows(rows, boxes, self.size)
        p = _Params(rows)
        img = _draw(p, _textures(p, marks) if detail else None, windows, self.size)
        img.add_(torch.stack(noise).mul_(p["noise"]).unsqueeze(1))
        return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


@contextlib.contextmanager
def _one_thread():
    """Run torch single-threaded inside, restoring the thread count after.

    Drawing works on many small planes: intra-op threads add overhead, and stall badly (10-40x measured)
    when another process holds a core. Callers parallelise with DataLoader workers instead.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _contact_sheet(faces: SyntheticFaces, identities: int, samples: int) -> torch.Tensor:
    """uint8 (3, identities*S, samples*S): one row per identity."""
    ids = torch.arange(identities).repeat_interleave(samples)
    imgs = faces.render(ids, torch.arange(samples).repeat(identities))
    s = faces.size
    return imgs.view(identities, samples, 3, s, s).permute(2, 0, 3, 1, 4).reshape(3, identities * s, samples * s)


def main(argv: list[str] | None = None) -> None:
    """Save a PNG grid of identities (rows) x samples (columns) for a person to look at."""
    ap = argparse.ArgumentParser(prog="python -m askd.data.synthetic", description=main.__doc__)
    ap.add_argument("out", help="output .png path")
    ap.add_argument("--identities", type=int, default=8)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=SPLITS, default="train")
    ap.add_argument("--size", type=int, default=112)
    args = ap.parse_args(argv)
    faces = SyntheticFaces(args.identities, args.samples, seed=args.seed, split=args.split, size=args.size)
    Image.fromarray(_contact_sheet(faces, args.identities, args.samples).permute(1, 2, 0).numpy()).save(args.out)
    print(f"wrote {args.out}: {args.identities} identities x {args.samples} samples")


if __name__ == "__main__":
    main()
