"""``python -m askd.data.synthetic OUT.png``: a PNG grid of identities (rows) x samples (columns) to look at."""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from .dataset import SPLITS, SyntheticFaces


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
