"""Procedural image-classification set: ``ShapesDataset``, the default data of ``--task classify`` (nothing is
downloaded). Like the synthetic faces, its classes need fine detail that fades when the image is down-sampled.

Shapes: an item is ``(image uint8 (3,S,S) RGB, label int)``; ``render(classes, samples, epoch=None)`` gives
uint8 (B,3,S,S). Item i is class i // samples and sample i % samples. S = ``size``, 32 by default.

A class is a COARSE shape and a texture filling it (:func:`class_parts`):
  shapes (10): disc, ring, square, diamond (the square at 45 degrees), triangle, nabla (pointing down), plus,
      cross (the plus at 45 degrees), hbar, vbar; 14-19 px across at 32 px, with a 2 px soft edge;
  textures (4): rows, columns, checker, diagonal, each at two scales added around the fill colour, zero-mean,
      within +-a: a FINE 4x4-periodic tile locked to the pixel grid, amplitude (1 - COARSE) a (rows and columns:
      1 px stripes, period 2; checker: 1 px squares; diagonal: 2 px stripes along the anti-diagonal, period 4),
      and COARSE waves of the same orientation, amplitude COARSE a: triangle waves of period WAVE_PERIOD = 12 px
      across horizontal stripes (rows), vertical ones (columns), both diagonals multiplied (checker) or one
      diagonal (diagonal), with a random phase per image.
Classes 2k and 2k+1 share shape s = k mod 10 and take textures s + 2r and s + 2r + 1 (mod 4), r = k // 10: up to
40 classes, every (shape, texture) pair once; the default 20 are the 10 shapes x 2 textures each. Every class is
closed under the horizontal flip of the training loop (the shapes are mirror-symmetric, rotations symmetric
about 0; the diagonal stripes turn the other way, still "diagonal").

Why HR separates every class: at 32 px the texture contrast 2a is 0.4-0.6 of the range (100-150 grey levels)
against noise of sigma <= 0.03 (8 levels), and the four textures sit at different frequencies (rows (1/2, 0),
columns (0, 1/2), checker (1/2, 1/2), diagonal (1/4, 1/4) cycles/px): one 3x3 convolution tells them apart.
Shapes are 14-19 px wide with distinct outlines; rotations stay within +-18 degrees, so square and diamond,
plus and cross, hbar and vbar remain 9 degrees or more apart.

Why LR keeps only a weak trace of the texture: a 4x bicubic down-sampling (antialiased: the cubic kernel
stretched 4x) has zeros at every non-zero multiple of the LR sampling rate (the cubic interpolates, so its
shifted copies sum to 1), which are exactly the frequencies of a 4x4-periodic pattern other than its mean: the
fine tiles vanish. The coarse waves have 3 LR px per period at 8 px, below the LR Nyquist limit, so they pass,
weakened (the cubic's response falls well before Nyquist, and their triangle harmonics are cut), on a shape 4-5
LR px across: a 1-2 period trace under the LR noise. So at 8 px twins 2k and 2k+1 differ by a faint oriented
ripple where at 32 px they differ by two textures: the teacher on HR separates every class, a student on LR
learns the shapes first and the ripple slowly (the tests measure the twins' distance; on the defaults, 5 epochs,
resnet_tiny_cbam, the HR teacher reached 99.9% top-1 and the LR base student 70.0%, with 50% the shape alone).
The fine tile's phase is drawn per image (0-3 px in x and y), so nearest-neighbour down-sampling, which picks
one pixel of each 4x4 block, turns the fine tile into either colour with equal odds.

Each image draws nuisances from (seed, split, class // 2, sample): position (+-16% of the half-width), size,
rotation (+-12 degrees), background colour (dark or light, tinted) with a linear gradient, fill colour
(tinted), texture contrast and phase, grey noise. So sample j of class 2k and sample j of class 2k+1 are twins
that differ in their texture alone: at HR a contrast that isolates the texture, at LR a faint ripple between
two labels (the tests measure this). ``split="val"`` draws other images than "train". The
training view (``dataset[(i, epoch)]``, see askd.data.views) adds a per-epoch jitter from
(seed, split, epoch, class, sample): a shift of up to +-8% of the half-width, a rotation of +-6 degrees, a scale
of 0.94-1.06, a new texture phase and new noise; the evaluation view (``dataset[i]``) is the image without it.
The horizontal flip is the training loop's.

Determinism: as askd.data.synthetic, drawing uses exactly rounded element-wise arithmetic (+ - * / abs min max
sqrt floor) per pixel and a per-image noise plane, so an image's bits do not depend on the batch it is rendered in,
on call order or on the thread count; ``render`` runs single-threaded (callers parallelise with workers).
"""

from __future__ import annotations

import math

import torch

from .synthetic.dataset import one_thread
from .synthetic.raster import Params, paint, pixel_centres
from .synthetic.sampling import Draws
from .views import ViewDataset

SHAPES = ("disc", "ring", "square", "diamond", "triangle", "nabla", "plus", "cross", "hbar", "vbar")
TEXTURES = ("rows", "columns", "checker", "diagonal")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
SPLITS = ("train", "val")
PERIOD = 4  # of the fine tiles, in px: it divides the 4x down-sampling factor, which erases them
WAVE_PERIOD = 12.0  # of the coarse waves, in px across the stripes: 3 px at 8 px, which 4x bicubic keeps, weakened
COARSE = 0.5  # the coarse waves' share of the texture's amplitude (the fine tiles have the rest)

# in units of the shape's radius (the disc's radius)
SQUARE = 0.85  # half side
TRIANGLE = 0.6  # inradius (circumradius 1.2)
RING = (0.7, 0.3)  # mid radius, half width
ARM = 0.3  # half width of the plus's arms
BAR = 0.45  # half height of a bar
# the width in px of a shape's soft edge: the texture that an edge cuts leaks into the LR image, 2 px leaks half
# as much as 1 px (measured by the tests' twin difference: 2.5% against 5.5% of the HR difference)
EDGE = 2.0
SQRT_HALF = math.sqrt(0.5)
SIN60 = math.sqrt(3) / 2

# nuisances, positions and sizes in [-1, 1] image coordinates
SHIFT, RADIUS, ANGLE = 0.16, (0.44, 0.58), 12.0  # per image
EPOCH_SHIFT, EPOCH_SCALE, EPOCH_ANGLE = 0.08, (0.94, 1.06), 6.0  # per epoch, training view only
DARK, LIGHT, FILL = (0.05, 0.3), (0.7, 0.95), (0.42, 0.58)  # grey levels of background and fill
TINT = (0.08, 0.12)  # per-channel colour offsets of background and fill, +-
AMPLITUDE = (0.2, 0.3)  # the texture's two colours: fill +- amplitude
GRADIENT, NOISE = 0.08, (0.005, 0.03)


def class_parts(label: int) -> tuple[int, int]:
    """(shape, texture) indices into SHAPES and TEXTURES of class ``label``; classes 2k and 2k+1 share a shape."""
    pair, member = divmod(label, 2)
    shape, round_ = pair % len(SHAPES), pair // len(SHAPES)
    return shape, (shape + 2 * round_ + member) % len(TEXTURES)


def _tiles() -> torch.Tensor:
    """The textures' 4x4 tiles of +-1, (len(TEXTURES), 4, 4), each with mean 0."""
    i, j = torch.arange(PERIOD)[:, None], torch.arange(PERIOD)[None, :]
    parity = [i % 2 + 0 * j, j % 2 + 0 * i, (i + j) % 2, (i + j) % 4 // 2]  # rows, columns, checker, diagonal
    return 1.0 - 2.0 * torch.stack(parity).float()


TILES = _tiles()


def _waves() -> tuple[tuple[float, float, float, float], ...]:
    """Per texture (ax, ay, bx, by): the coarse pattern is tri(ax x + ay y + phase) * tri(bx x + by y + phase'),
    x, y in px, tri the triangle wave of period 1 (:func:`_zigzag`); (0, 0) for b means no second factor."""
    k, d = 1 / WAVE_PERIOD, math.sqrt(0.5) / WAVE_PERIOD  # d: the 45-degree components are WAVE_PERIOD apart
    return (0.0, k, 0.0, 0.0), (k, 0.0, 0.0, 0.0), (d, 0.0, 0.0, d), (d, d, 0.0, 0.0)  # rows, columns, ...


WAVES = _waves()


def _zigzag(s: torch.Tensor) -> torch.Tensor:
    """The triangle wave of period 1, in place: 1 at integers, -1 halfway, mean 0 (4 |frac(s) - 1/2| - 1)."""
    return s.sub_(s.floor()).sub_(0.5).abs_().mul_(4).sub_(1)


# Signed distance-like functions of the shapes in local coordinates (u, v) (B,H,W), radius units, v down:
# negative inside, about the distance to the outline near it.
def _disc(u, v):
    return torch.sqrt(u * u + v * v) - 1.0


def _ring(u, v):
    return (torch.sqrt(u * u + v * v) - RING[0]).abs() - RING[1]


def _square(u, v):
    return torch.maximum(u.abs(), v.abs()) - SQUARE


def _diamond(u, v):
    return (u.abs() + v.abs()) * SQRT_HALF - SQUARE


def _triangle(u, v):
    return torch.maximum(v, u.abs() * SIN60 - v * 0.5) - TRIANGLE  # apex up: edges below and at +-60 degrees


def _nabla(u, v):
    return _triangle(u, -v)


def _plus(u, v):
    a, b = u.abs(), v.abs()
    return torch.minimum(torch.maximum(a - ARM, b - 1.0), torch.maximum(b - ARM, a - 1.0))


def _cross(u, v):
    return _plus((u + v) * SQRT_HALF, (v - u) * SQRT_HALF)


def _hbar(u, v):
    return torch.maximum(u.abs() - 1.0, v.abs() - BAR)


def _vbar(u, v):
    return _hbar(v, u)


OUTLINES = (_disc, _ring, _square, _diamond, _triangle, _nabla, _plus, _cross, _hbar, _vbar)


def _nuisances(d: Draws) -> dict[str, float]:
    """Per-image scalars (see the module docstring); the texture phase as floats 0..3."""
    p = {"cx": d.uniform(-SHIFT, SHIFT), "cy": d.uniform(-SHIFT, SHIFT), "radius": d.uniform(*RADIUS),
         "angle": d.uniform(-ANGLE, ANGLE)}
    level = d.uniform(*DARK) if d.chance(0.5) else d.uniform(*LIGHT)
    fill = d.uniform(*FILL)
    for c in "rgb":
        p["bg_" + c] = level + d.uniform(-TINT[0], TINT[0])
    for c in "rgb":
        p["fill_" + c] = fill + d.uniform(-TINT[1], TINT[1])
    p["amplitude"] = d.uniform(*AMPLITUDE)
    p["grad_x"], p["grad_y"] = d.uniform(-GRADIENT, GRADIENT), d.uniform(-GRADIENT, GRADIENT)
    p["noise"] = d.uniform(*NOISE)
    _phase(d, p)
    return p


def _phase(d: Draws, p: dict[str, float]) -> None:
    """The texture's phases: the fine tile's in whole px (0..3), the two coarse waves' in periods, [0, 1)."""
    p["phase_y"], p["phase_x"] = float(int(d.uniform(0, PERIOD))), float(int(d.uniform(0, PERIOD)))
    p["wave_a"], p["wave_b"] = d.uniform(), d.uniform()


def _wave_coefs(texture: int, p: dict[str, float]) -> dict[str, float]:
    """Texture ``texture``'s coarse wave coefficients with ``p``'s phases (a missing second factor: phase 0)."""
    ax, ay, bx, by = WAVES[texture]
    return {"ax": ax, "ay": ay, "a0": p["wave_a"], "bx": bx, "by": by, "b0": p["wave_b"] if bx or by else 0.0}


def _epoch_jitter(d: Draws, p: dict[str, float]) -> None:
    """The training view's per-epoch changes to ``p``, in place."""
    p["cx"] += d.uniform(-EPOCH_SHIFT, EPOCH_SHIFT)
    p["cy"] += d.uniform(-EPOCH_SHIFT, EPOCH_SHIFT)
    p["radius"] *= d.uniform(*EPOCH_SCALE)
    p["angle"] += d.uniform(-EPOCH_ANGLE, EPOCH_ANGLE)
    _phase(d, p)


def _coarse(p: Params, size: int) -> torch.Tensor:
    """The coarse waves (B,S,S) in [-1, 1] of the textures with coefficients in ``p`` (see :func:`_wave_coefs`)."""
    t = torch.arange(size, dtype=torch.float32)
    x, y = t[None, None, :], t[None, :, None]
    first = _zigzag((x * p["ax"]).add(y * p["ay"]).add_(p["a0"]))
    return first.mul_(_zigzag((x * p["bx"]).add(y * p["by"]).add_(p["b0"])))


class ShapesDataset(ViewDataset):
    """Procedural shapes with textures at two scales: ``num_classes * samples`` items of (uint8 (3,S,S), label).

    Attributes: ``num_classes``, ``classes`` ("<shape>/<texture>"), ``samples`` (per class), ``size``, ``seed``,
    ``split``, ``augments`` (True for the train split).
    """

    def __init__(self, num_classes: int = 20, samples: int = 250, seed: int = 0, split: str = "train",
                 size: int = 32):
        if not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be an int in [1, {MAX_CLASSES}], got {num_classes!r}")
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.num_classes, self.samples, self.seed, self.split, self.size = num_classes, samples, seed, split, size
        self.augments = split == "train"
        self.classes = [f"{SHAPES[s]}/{TEXTURES[t]}" for s, t in map(class_parts, range(num_classes))]

    def __len__(self) -> int:
        return self.num_classes * self.samples

    def eval_view(self, index: int) -> tuple[torch.Tensor, int]:
        label, sample = divmod(index, self.samples)
        return self.render(torch.tensor([label]), torch.tensor([sample]))[0], label

    def train_view(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        label, sample = divmod(index, self.samples)
        return self.render(torch.tensor([label]), torch.tensor([sample]), epoch)[0], label

    def render(self, classes: torch.Tensor, samples: torch.Tensor, epoch: int | None = None,
               detail: bool = True) -> torch.Tensor:
        """Images uint8 (B,3,size,size) of class and sample indices, integer (B,) each; ``epoch``: the training
        view of that epoch, None: the evaluation view. Samples beyond ``samples`` are valid (fresh images).
        ``detail=False`` paints the fill colour (the texture's mean) in place of the texture and changes nothing
        else (for tests and ablations)."""
        labels, sams = self._check_indices(classes, samples)
        with one_thread():
            return self._draw(labels, sams, epoch, detail)

    def _check_indices(self, classes, samples) -> tuple[list[int], list[int]]:
        classes, samples = torch.as_tensor(classes), torch.as_tensor(samples)
        if classes.dim() != 1 or classes.shape != samples.shape or classes.is_floating_point() \
                or samples.is_floating_point():
            raise ValueError(f"render expects integer classes and samples of one shape (B,), got "
                             f"{tuple(classes.shape)} {classes.dtype} and {tuple(samples.shape)} {samples.dtype}")
        labels, sams = classes.tolist(), samples.tolist()
        if labels and not 0 <= min(labels) <= max(labels) < self.num_classes:
            raise ValueError(f"classes must be in [0, {self.num_classes}), got [{min(labels)}, {max(labels)}]")
        if sams and min(sams) < 0:
            raise ValueError(f"samples must be >= 0, got {min(sams)}")
        return labels, sams

    def _draw(self, labels: list[int], sams: list[int], epoch: int | None, detail: bool) -> torch.Tensor:
        n, size = len(labels), self.size
        if n == 0:
            return torch.empty(0, 3, size, size, dtype=torch.uint8)
        rows, noise = [], []
        for label, sample in zip(labels, sams, strict=True):
            d = Draws("shapes", self.seed, self.split, label // 2, sample, n=24)  # twins: see the docstring
            p = _nuisances(d)
            if epoch is not None:
                d = Draws("shapes-epoch", self.seed, self.split, epoch, label, sample, n=8)
                _epoch_jitter(d, p)
            p["cos"], p["sin"] = math.cos(math.radians(p["angle"])), math.sin(math.radians(p["angle"]))
            p["inv_radius"], p["edge"] = 1.0 / p["radius"], p["radius"] * size / (2 * EDGE)  # edges per radius unit
            p.update(_wave_coefs(class_parts(label)[1], p))
            rows.append(p)
            noise.append(torch.randn(size, size, generator=d.generator))  # grey sensor noise
        p = Params(rows)
        t = pixel_centres(size)
        x, y = t[None, None, :] - p["cx"], t[None, :, None] - p["cy"]  # (B,1,S), (B,S,1)
        u = (x * p["cos"]).add(y * p["sin"]).mul_(p["inv_radius"])  # the shape's own frame, radius units
        v = (y * p["cos"]).sub(x * p["sin"]).mul_(p["inv_radius"])
        cover = torch.empty(n, size, size)
        shapes = torch.tensor([class_parts(label)[0] for label in labels])
        for k in shapes.unique().tolist():
            idx = (shapes == k).nonzero()[:, 0]
            # coverage 1/2 on the outline, 0 to 1 over EDGE px across it
            cover[idx] = OUTLINES[k](u[idx], v[idx]).mul_(p["edge"][idx]).neg_().add_(0.5).clamp_(0, 1)
        gradient = (t[None, None, :] * p["grad_x"]).add(t[None, :, None] * p["grad_y"])  # (B,S,S)
        img = gradient.unsqueeze(1).add(p.rgb("bg"))  # (B,3,S,S)
        fill = p.rgb("fill")
        if detail:
            textures = torch.tensor([class_parts(label)[1] for label in labels])
            ry = (torch.arange(size) + p["phase_y"].view(n, 1).long()) % PERIOD  # (B,S)
            rx = (torch.arange(size) + p["phase_x"].view(n, 1).long()) % PERIOD
            fine = TILES[textures[:, None, None], ry[:, :, None], rx[:, None, :]]  # (B,S,S)
            pattern = fine.mul_(1 - COARSE).add_(_coarse(p, size).mul_(COARSE))  # |pattern| <= 1: no clipping
            fill = fill + (pattern * p["amplitude"]).unsqueeze(1)
        paint(img, cover, fill)
        img.add_(torch.stack(noise).mul_(p["noise"]).unsqueeze(1))
        return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
