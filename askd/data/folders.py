"""Image-folder face dataset: ``ImageFolderFaces(root, size=112, identities=None)``, ``list_identities(root)``
and ``split_identities(root, fraction, setting)`` (the identities to train on and those held out; the same
split of a list of names: ``split_names``).

Layout: ``root/<identity>/<image>`` with images ending in .pgm, .png, .jpg or .jpeg (any case); other files
and deeper folders are ignored. Identities are the folders that hold at least one image, sorted by name
(plain string order: "s10" before "s2"); labels are 0..K-1 in that order, or in the order of ``identities``
when a subset is given.

An item is ``(image, label)``: image uint8 (3, size, size) RGB, label an int. Grey (L) images become three
identical channels; every other mode is converted to RGB.

Resize rule: scale so that the SHORTER side equals ``size`` (Pillow bilinear, antialiased when shrinking;
the longer side is rounded), then centre-crop the longer side to ``size`` (an odd excess leaves the extra
pixel at the bottom / right). ORL's 92x112 portraits become 112x136, cropped by 12 px top and bottom.

Images are decoded on each ``__getitem__``; callers may use DataLoader workers.

Helpers for other image readers (askd.data.classfolders): ``open_rgb`` (decode to RGB, a DataError naming
the file for a corrupt image or a decompression bomb), ``image_files`` and ``rgb_tensor``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

EXTENSIONS = (".pgm", ".png", ".jpg", ".jpeg")
ENCODINGS = ("png", "jpeg")  # what askd writes: PNG round-trips bit-exactly, JPEG is smaller
LAYOUT = "ROOT/<identity>/<image>.{" + ",".join(e[1:] for e in EXTENSIONS) + "}"


class DataError(ValueError):
    """Data that cannot be used (an unreadable image, an unusable folder); the message names the path."""


def _root(root: str | Path) -> Path:
    """``root`` as a Path, or a FileNotFoundError / NotADirectoryError that names it."""
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"image folder root {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"image folder root {str(path)!r} is not a directory; expected {LAYOUT}")
    return path


def image_files(folder: Path, extensions: tuple[str, ...] = EXTENSIONS) -> list[Path]:
    """Files directly inside ``folder`` whose suffix, lower-cased, is one of ``extensions``, sorted by name."""
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in extensions and f.is_file())


def list_identities(root: str | Path) -> list[str]:
    """Names of the identity folders under ``root`` that hold at least one image, sorted.

    Raises FileNotFoundError when there are none (and when ``root`` is missing).
    """
    path = _root(root)
    names = sorted(d.name for d in path.iterdir() if d.is_dir() and image_files(d))
    if not names:
        raise FileNotFoundError(f"no images found under {str(path)!r}; expected {LAYOUT}")
    return names


def split_identities(root: str | Path, fraction: float, setting: str) -> tuple[list[str], list[str]]:
    """(identities to train on, identities held out): the last ``fraction`` of ``list_identities(root)``
    (at least 2), leaving at least 2; else a DataError that names ``setting`` (the option that asked)."""
    return split_names(list_identities(root), fraction, setting, str(root))


def split_names(names: list[str], fraction: float, setting: str, where: str) -> tuple[list[str], list[str]]:
    """(first names, last ``fraction`` of ``names``): at least 2 in each part, else a DataError naming ``setting``
    and ``where`` (the folder or split the names come from)."""
    held = max(2, round(len(names) * fraction))
    if len(names) - held < 2:
        raise DataError(
            f"{where} has {len(names)} identity folders with images; need at least {held + 2} ({held} held out "
            f"at {setting}={fraction}, 2 to train on)"
        )
    return names[:-held], names[-held:]


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` decoded to an RGB PIL image (L replicates into three channels; alpha is dropped).

    Raises a DataError (a ValueError) naming the file when it cannot be decoded, also for a decompression bomb.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    # PIL's errors for corrupt, truncated or odd files; a bomb error for a header claiming a huge image, which a
    # single corrupt byte in a stored image's size gives (it derives from Exception, not from any of the others)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from err


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """uint8 (3, size, size) RGB of the image at ``path`` under the module's resize rule.

    Raises a DataError (a ValueError) naming the file when it cannot be decoded.
    """
    rgb = open_rgb(path)
    w, h = rgb.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return rgb_tensor(rgb)


def rgb_tensor(rgb: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W) of an RGB PIL image."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def check_encoding(fmt: str, quality: int) -> None:
    """ValueError unless ``fmt`` is one of ENCODINGS and ``quality`` an int in 1..100."""
    if fmt not in ENCODINGS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {list(ENCODINGS)}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an int in 1..100, got {quality!r}")


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """PNG (lossless) or JPEG (``quality``) bytes of a uint8 (H,W,3) RGB array."""
    buf = io.BytesIO()
    options = {"quality": quality} if fmt == "jpeg" else {}
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format=fmt.upper(), **options)
    return buf.getvalue()


class ImageFolderFaces(Dataset):
    """Faces from ``root/<identity>/<image>``: items (uint8 (3,size,size) RGB, int label).

    Attributes: ``classes`` (identity names, label order), ``num_classes``, ``samples`` ([(path, label)]).
    ``identities`` (folder names) restricts the set and labels it 0..len-1 in the given order.
    """

    def __init__(self, root: str | Path, size: int = 112, identities: list[str] | None = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.root, self.size = Path(root), size
        found = list_identities(self.root)
        self.classes = found if identities is None else self._subset(list(identities), found)
        self.num_classes = len(self.classes)
        self.samples = [(f, label) for label, name in enumerate(self.classes) for f in image_files(self.root / name)]

    def _subset(self, names: list[str], found: list[str]) -> list[str]:
        if not names:
            raise ValueError("identities is empty; give None for all identities or a list of folder names")
        if len(set(names)) != len(names):
            raise ValueError(f"identities has duplicates: {sorted({n for n in names if names.count(n) > 1})}")
        missing = [n for n in names if n not in set(found)]
        if missing:
            raise ValueError(f"identities {missing} have no images under {str(self.root)!r}; "
                             f"available: {found[:10]}{' ...' if len(found) > 10 else ''}")
        return names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, self.size), label
