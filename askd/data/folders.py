"""Image-folder faces: ``root/<identity>/<image>`` with PGM, PNG or JPEG images (e.g. the ORL database).

Items are ``(image uint8 (3,size,size) RGB, label int)``. Identities are the sub-folders that hold at
least one image, sorted by name and labelled 0..K-1 in that order; other files are ignored. Grey images
become 3 identical channels. Resize rule: scale so that the SHORTER side equals ``size`` (bilinear,
antialiased, by Pillow), then centre-crop the longer side to ``size``; ORL's 92x112 portraits become
112x136 and lose 12 rows at the top and at the bottom.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

EXTENSIONS = (".pgm", ".png", ".jpg", ".jpeg")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory")


def list_identities(root: str | Path) -> list[str]:
    """Names of the identity folders under ``root`` that hold at least one image, sorted."""
    root = Path(root)
    _check_root(root)
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and _images(d))
    if not names:
        raise ValueError(f"no images found under {root}; expected {root}/<identity>/<image>.{{pgm,png,jpg,jpeg}}")
    return names


def load_face(path: str | Path, size: int = 112) -> torch.Tensor:
    """One image file -> uint8 (3,size,size) RGB by the module's resize-and-centre-crop rule."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((rw, rh), Image.BILINEAR, reducing_gap=None)
            left, top = (rw - size) // 2, (rh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


class ImageFolderFaces(Dataset):
    """Faces from ``root/<identity>/<image>``; ``identities`` picks (and orders) a subset of folders."""

    def __init__(self, root: str | Path, size: int = 112, identities: Sequence[str] | None = None):
        self.root, self.size = Path(root), size
        known = list_identities(self.root)
        if identities is None:
            identities = known
        missing = sorted(set(identities) - set(known))
        if missing:
            raise ValueError(f"identity folders without images under {self.root}: {', '.join(missing)}")
        self.classes = list(identities)
        self.num_classes = len(self.classes)
        self.samples = [(p, label) for label, name in enumerate(self.classes) for p in _images(self.root / name)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_face(path, self.size), label
