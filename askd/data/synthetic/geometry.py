"""Shape layout: per-image ellipse coefficients and colours (``_layout``), the face-coordinate box each
drawing group can touch, and the pixel windows of a chunk that hold those boxes (``_windows``).
"""

from __future__ import annotations

import math

from .sampling import _put, _shade


def _ellipse_coefs(p: dict[str, float], name: str, cx: float, cy: float, ax: float, ay: float) -> None:
    """Store what ``raster._Grid.ellipse`` needs for ((u-cx)/ax)^2 + ((v-cy)/ay)^2 <= 1: centre, scales, offset.

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
    """Add to ``p`` the per-image coefficients of every shape and colour ``raster._draw`` uses (Python floats).

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

