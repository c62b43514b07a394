"""Low-resolution synthesis: the official nearest + fixed-blur pipeline against a written-out reference,
the paper's bicubic pipeline by its properties, and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import askd.data
from askd.data import degrade, low_res_size
from askd.data.degrade import gaussian_kernel1d

SIZES = (56, 28, 14)


def taps(sigma, size=5):
    """Normalised Gaussian taps exp(-x^2 / (2 sigma^2)), x = -2..2, as Python floats."""
    raw = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    total = sum(raw)
    return [r / total for r in raw]


def reflect(i, n):
    """Index of reflect padding (edge pixel not repeated)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def blur_reference(x, sigma_x, sigma_y):
    """Separable 5x5 Gaussian, sigma_x along width, sigma_y along height, reflect padding, by index gathers."""
    h, w = x.shape[-2:]
    kx, ky = taps(sigma_x), taps(sigma_y)
    out = torch.zeros_like(x)
    for dy in range(-2, 3):
        rows = torch.tensor([reflect(i + dy, h) for i in range(h)])
        for dx in range(-2, 3):
            cols = torch.tensor([reflect(j + dx, w) for j in range(w)])
            out += ky[dy + 2] * kx[dx + 2] * x[..., rows, :][..., :, cols]
    return out


def nearest_reference(x, size):
    """Nearest down to size x size and back up (sides multiples of size): (i, j) <- (r*(i//r), r*(j//r))."""
    h, w = x.shape[-2:]
    ry, rx = h // size, w // size
    rows = torch.tensor([(i // ry) * ry for i in range(h)])
    cols = torch.tensor([(j // rx) * rx for j in range(w)])
    return x[..., rows, :][..., :, cols]


def test_gaussian_kernel1d_matches_formula():
    for sigma in (0.1, 0.75, 2.0):
        k = gaussian_kernel1d(5, sigma)
        assert k.shape == (5,) and k.dtype == torch.float64
        assert torch.allclose(k, torch.tensor(taps(sigma), dtype=torch.float64), rtol=1e-12, atol=1e-15)
        assert float(k.sum()) == pytest.approx(1.0, abs=1e-12)
        assert torch.equal(k, k.flip(0))


def test_sigma_x_kernel_is_nearly_a_delta():
    k = gaussian_kernel1d(5, 0.1)
    assert torch.allclose(k, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-15)
    k2 = gaussian_kernel1d(5, 2.0)
    # sigma 2 is wide: the outer taps are e^{-1/2} of the centre one
    assert float(k2[0] / k2[2]) == pytest.approx(math.exp(-0.5), rel=1e-12)


def test_nearest_step_gives_8x8_blocks_at_14():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 112, 112, dtype=torch.float64)
    up = F.interpolate(F.interpolate(x, size=(14, 14), mode="nearest"), size=(112, 112), mode="nearest")
    blocks = up.reshape(2, 3, 14, 8, 14, 8)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert torch.equal(blocks[:, :, :, 0, :, 0], x[..., ::8, ::8])
    assert torch.equal(up, nearest_reference(x, 14))


@pytest.mark.parametrize("size", SIZES)
def test_official_matches_reference(size):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 112, 112, dtype=torch.float64) * 2 - 1
    out = degrade(x, size, "official")
    assert out.shape == x.shape and out.dtype == torch.float64
    want = blur_reference(nearest_reference(x, size), 0.1, 2.0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_official_float32():
    torch.manual_seed(2)
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    out = degrade(x, 28, "official")
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), blur_reference(nearest_reference(x.double(), 28), 0.1, 2.0), atol=1e-6, rtol=0
    )


def test_official_structure_at_14():
    """Distinct pixel values: rows are constant over each 8-wide block (sigma_x ~ 0 along width), and rows at
    least 2 away from a vertical block edge equal the block's top-left source pixel (the 5 taps stay inside)."""
    x = torch.arange(112 * 112, dtype=torch.float64).reshape(1, 1, 112, 112) / 1000
    out = degrade(x, 14, "official")
    blocks = out.reshape(14, 8, 14, 8)
    torch.testing.assert_close(blocks, blocks[..., :1].expand_as(blocks), rtol=0, atol=1e-9)
    src = x[0, 0, ::8, ::8]  # (14, 14)
    for r in range(2, 6):
        torch.testing.assert_close(blocks[:, r, :, :], src[:, :, None].expand(14, 14, 8), rtol=0, atol=1e-9)
    # the blur along height mixes neighbouring blocks at their edges
    assert (blocks[1:, 0] - src[1:, :, None]).abs().max() > 0.1


def test_blur_along_height_not_width():
    """A horizontal stripe pattern (varies along height) is blurred; a vertical one (along width) is almost not."""
    x = torch.zeros(1, 1, 112, 112, dtype=torch.float64)
    horizontal = x.clone()
    horizontal[..., 50:58, :] = 1.0  # one 8-row band, aligned with the blocks
    vertical = x.clone()
    vertical[..., :, 48:56] = 1.0
    h_out = degrade(horizontal, 14, "official")
    v_out = degrade(vertical, 14, "official")
    assert (h_out - nearest_reference(horizontal, 14)).abs().max() > 0.1
    torch.testing.assert_close(v_out, nearest_reference(vertical, 14), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("size", SIZES)
def test_constant_image_stays_constant(variant, size):
    x = torch.full((2, 3, 112, 112), 0.3, dtype=torch.float64)
    x[1] = -0.7
    out = degrade(x, size, variant)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_batched_equals_per_image(variant):
    torch.manual_seed(3)
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    x[1] *= 0.2
    out = degrade(x, 28, variant)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], degrade(x[i : i + 1], 28, variant), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_paper_shape_dtype_and_per_image_range(size):
    """A step edge makes bicubic overshoot; the output stays inside each image's own input range."""
    x = torch.zeros(2, 3, 112, 112)
    x[..., :, 56:] = 1.0
    x[1] = x[1] * 2 - 5  # image 1 lies in [-5, -3]; a batch-global clamp would let it reach up to 1
    out = degrade(x, size, "paper")
    assert out.shape == x.shape and out.dtype == torch.float32
    for i in range(2):
        assert float(out[i].min()) >= float(x[i].min())
        assert float(out[i].max()) <= float(x[i].max())
    # without the clamp the bicubic pipeline overshoots this edge
    unclamped = F.interpolate(
        F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True),
        size=(112, 112),
        mode="bicubic",
        align_corners=False,
    )
    assert float(unclamped[1].max()) > -3.0 + 1e-3
    # and the edge is softened, not kept
    assert ((out[0] > 0.05) & (out[0] < 0.95)).any()


@pytest.mark.parametrize("size", SIZES)
def test_paper_reference_pipeline(size):
    """bicubic-antialias down, 5x5 Gaussian sigma 0.75 (reflect) at LR, bicubic up, clamp per image."""
    torch.manual_seed(4)
    x = torch.rand(2, 3, 112, 112, dtype=torch.float64) * 2 - 1
    low_res = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    up = F.interpolate(blur_reference(low_res, 0.75, 0.75), size=(112, 112), mode="bicubic", align_corners=False)
    lo = x.amin(dim=(1, 2, 3)).view(2, 1, 1, 1)
    hi = x.amax(dim=(1, 2, 3)).view(2, 1, 1, 1)
    want = torch.maximum(torch.minimum(up, hi), lo)
    torch.testing.assert_close(degrade(x, size, "paper"), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", SIZES)
def test_paper_smooth_kept_checkerboard_flattened(size):
    u = torch.arange(112, dtype=torch.float64)
    f = torch.cos(math.pi * (u + 0.5) / 112)  # half a period across the image, flat at the borders
    smooth = (f[:, None] * f[None, :]).expand(1, 3, 112, 112).contiguous()
    assert float((degrade(smooth, size, "paper") - smooth).abs().max()) < 0.1
    checker = ((u[:, None] + u[None, :]) % 2 * 2 - 1).expand(1, 3, 112, 112).contiguous()
    flat = degrade(checker, size, "paper")
    assert float(checker.std()) > 0.99
    assert float(flat.std()) < 0.01 and float(flat.abs().max()) < 0.05


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("size", SIZES)
def test_scale_sizes_work(variant, size):
    torch.manual_seed(5)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    out = degrade(x, size, variant)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # information is lost: the result differs from the input
    assert float((out - x).abs().mean()) > 0.05


def test_bad_arguments_raise():
    x = torch.rand(1, 3, 112, 112)
    for size in (0, 2, 113, -14):
        with pytest.raises(ValueError):
            degrade(x, size, "official")
    with pytest.raises(ValueError):
        degrade((x * 255).to(torch.uint8), 14, "official")
    with pytest.raises(ValueError):
        degrade(x.long(), 14, "paper")
    with pytest.raises(ValueError):
        degrade(x[0], 14, "official")
    with pytest.raises(ValueError):
        degrade(x[None], 14, "official")
    with pytest.raises(ValueError):
        degrade(x, 14, "bicubic")


def test_low_res_size():
    assert low_res_size(8) == 14
    assert low_res_size(4) == 28
    assert low_res_size(2) == 56
    assert low_res_size(2, size=64) == 32
    for bad in (3, 1, 16):
        with pytest.raises(ValueError):
            low_res_size(bad)


def test_lr_size_is_the_deprecated_name_of_low_res_size():
    with pytest.warns(DeprecationWarning, match="askd.data.lr_size is deprecated; use askd.data.low_res_size"):
        from askd.data import lr_size
    assert lr_size is low_res_size and lr_size(4) == 28
    with pytest.raises(AttributeError, match="no attribute 'hr_size'"):
        askd.data.hr_size  # noqa: B018
