"""Seeded random draws: an identity's coarse traits (``_identity``) and an image's jitter (``_jitter``).

Every number comes from a ``Draws``, a torch.Generator seeded by a stable hash of (seed, split, identity) or
(seed, split, identity, sample). Parameters are Python floats in a dict by name, an RGB triple as
``<name>_r``, ``<name>_g``, ``<name>_b`` (``_put``); face units as in ``_identity``.
"""

from __future__ import annotations

import hashlib
import math

import torch

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


def _seed(*key) -> int:
    """A 63-bit seed from a stable hash of ``key`` (Python's hash() is salted per process)."""
    text = "/".join(str(k) for k in ("askd-synthetic", *key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class Draws:
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


def _identity(d: Draws) -> dict[str, float]:
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


def _jitter(d: Draws, size: int) -> dict[str, float]:
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

