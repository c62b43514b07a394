"""Figures of the CBAM spatial attention maps over the face (as the A-SKD paper's figures 4 and 5).

``stage_last_blocks(maps)``: the last block of each stage. ``spatial_maps(model, x, blocks)``: the spatial
maps of chosen blocks, float (B,len(blocks),S,S) at the input size S. ``attention_figure(path, faces, rows,
block_names)``: a PNG with one row per (image, model): the model's input face, then its spatial map of each
chosen block overlaid on it.

Maps are shown as they are returned (pre-sigmoid logits in the ``official`` variant, sigmoid maps in
``paper``), each scaled to [0, 1] by its own min and max, so the figure shows where a block attends, not how
strongly; bilinear up-sampling from the block's H x W (56, 28, 14 or 7 px in IR-50) to the face size.
Needs matplotlib (``pip install matplotlib``), imported only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def stage_last_blocks(maps) -> list[int]:
    """Index of the last CBAM block of each stage in a model's ``maps``: where the spatial size changes next."""
    sizes = [spatial.shape[-1] for _, spatial in maps]
    return [i for i in range(len(sizes)) if i == len(sizes) - 1 or sizes[i + 1] != sizes[i]]


def spatial_maps(model: nn.Module, x: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """float (B,len(blocks),S,S): the model's spatial maps of ``blocks`` on x (B,3,S,S), up-sampled to S x S
    and min-max scaled per image and block to [0, 1] (a constant map becomes 0)."""
    maps = model(x)[1]
    bad = [b for b in blocks if not 0 <= b < len(maps)]
    if bad:
        raise ValueError(f"blocks {bad} out of range: the model has {len(maps)} CBAM blocks")
    size = x.shape[-1]
    up = [F.interpolate(maps[b][1].float(), size=(size, size), mode="bilinear", align_corners=False) for b in blocks]
    m = torch.cat(up, 1)
    lo, hi = m.amin((2, 3), keepdim=True), m.amax((2, 3), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def attention_figure(
    path: str | Path,
    faces: Sequence[torch.Tensor],
    rows: Sequence[tuple[str, int, torch.Tensor]],
    block_names: Sequence[str],
    alpha: float = 0.5,
) -> Path:
    """Write a PNG grid: one row per entry of ``rows``, columns = the input face, then one map per block.

    faces: the model inputs, float (3,S,S) in [-1,1], one per distinct (image, resolution);
    rows: (label, index into faces, maps float (len(block_names),S,S) in [0,1]); block_names: column titles.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cols = 1 + len(block_names)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols, 1.55 * len(rows)), squeeze=False)
    for r, (label, face_index, maps) in enumerate(rows):
        face = ((faces[face_index].float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[r][0].imshow(face)
        axes[r][0].set_ylabel(label, fontsize=7)
        for c in range(len(block_names)):
            axes[r][c + 1].imshow(face)
            axes[r][c + 1].imshow(maps[c].cpu().numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, name in enumerate(["input", *block_names]):
        axes[0][c].set_title(name, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
