"""Argmax comparison for kernels whose compared values may differ from the reference's in the last bit."""

from __future__ import annotations

import torch


def check_argmax(idx, idx_ref, values, tol, max_fraction=0.01):
    """idx equals idx_ref except at near-ties, where the values at both indices agree within tol (rtol, atol).

    idx, idx_ref (..., N) int; values (..., N, K), gathered along the last dim. At most ``max_fraction`` of the
    indices may differ: a kernel that picks wrong maxima everywhere still fails.
    """
    differ = idx != idx_ref
    if differ.any():
        picked = values.gather(-1, idx.long().unsqueeze(-1))[differ]
        best = values.gather(-1, idx_ref.long().unsqueeze(-1))[differ]
        rtol, atol = tol
        torch.testing.assert_close(picked, best, rtol=rtol, atol=atol, equal_nan=True)
    assert differ.float().mean().item() <= max_fraction
