"""ImageNet-style class folders for image classification: ``ClassFolders(root, size=224, seed=0)`` and
``is_class_folders(path)``.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``, images ending in .jpeg, .jpg, .png,
.ppm, .bmp, .pgm or .webp (any case) directly inside a class folder; other files and deeper folders are ignored.
The classes are the sorted names of the train subfolders (plain string order, as torchvision's ImageFolder),
labels 0..K-1 in that order; every val class must be one of them and keeps its train label. A class folder
without images, or a val class unknown to train, is a DataError that names it.

Views (askd.data.views): ``dataset[i]`` is the evaluation view of item i and ``dataset[(i, epoch)]`` the training
view of that epoch. An item is ``(image uint8 (3,S,S) RGB, label int)``, S = ``size``. The training view is
torchvision's RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)): up to 10 draws of an area fraction and a
log-uniform aspect ratio until the box fits, else the centre crop at the nearest allowed ratio; the box is cut out
and resized to size x size (Pillow bilinear, antialiased when shrinking). The evaluation view resizes the shorter
side to round(size * 256 / 224) (256 for 224) and cuts the centre size x size, as the ImageNet evaluation does.
Images are decoded in ``__getitem__`` (so in DataLoader workers) by ``askd.data.folders.open_rgb``: grey, CMYK,
palette and alpha images become RGB, a corrupt file or a decompression bomb a DataError naming the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

from .folders import DataError, image_files, open_rgb, rgb_tensor
from .views import ViewDataset, view_generator

EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".webp")
LAYOUT = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"
SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction
RATIO = (3 / 4, 4 / 3)  # and its aspect ratio (width / height)
ATTEMPTS = 10


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=g).item()


def _randint(g: torch.Generator, high: int) -> int:
    """An int in [0, high]."""
    return int(torch.randint(0, high + 1, (1,), generator=g))


def resized_crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box in a width x height image, drawn from ``g``."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(ATTEMPTS):
        target = area * _uniform(g, *SCALE)
        aspect = math.exp(_uniform(g, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(g, height - h)
            return _randint(g, width - w), top, w, h
    # no draw fitted: the whole image, cut to the nearest allowed aspect ratio
    w, h = width, height
    if width / height < RATIO[0]:
        h = round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w = round(height * RATIO[1])
    return (width - w) // 2, (height - h) // 2, w, h


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """The centre size x size of ``img`` (an odd excess puts the extra pixel at the bottom / right)."""
    w, h = img.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """``img`` scaled so that its shorter side is ``side`` px (the longer one truncated, as torchvision's
    Resize(int)); Pillow bilinear."""
    w, h = img.size
    if min(w, h) == side:
        return img
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    return img.resize(size, Image.Resampling.BILINEAR)


def _class_images(folder: Path) -> list[Path]:
    images = image_files(folder, EXTENSIONS)
    if not images:
        raise DataError(f"class folder {str(folder)!r} holds no images; expected files ending in "
                        f"{', '.join(EXTENSIONS)} directly inside it")
    return images


def _subfolders(path: Path) -> list[str]:
    """Sorted names of the folders directly inside ``path`` (hidden ones left out)."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def is_class_folders(path: str | Path) -> bool:
    """Whether ``path`` has a ``train`` folder with at least one subfolder (an ImageNet-style tree)."""
    train = Path(path) / "train"
    return train.is_dir() and bool(_subfolders(train))


class ClassFolderSplit(ViewDataset):
    """One split of a :class:`ClassFolders` tree: ``samples`` [(path, label)], the views of the module docstring."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], size: int, seed: int, augments: bool):
        self.samples, self.classes, self.num_classes = samples, classes, len(classes)
        self.size, self.seed, self.augments = size, seed, augments
        self.resize_side = round(size * 256 / 224)

    def __len__(self) -> int:
        return len(self.samples)

    def eval_view(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return rgb_tensor(centre_crop(resize_shorter(open_rgb(path), self.resize_side), self.size)), label

    def train_view(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = open_rgb(path)
        left, top, w, h = resized_crop_box(*img.size, view_generator(self.seed, epoch, index))
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        return rgb_tensor(img), label


class ClassFolders:
    """``root/train/<class>/<image>`` and ``root/val/<class>/<image>``: ``.train`` (augments) and ``.val``,
    :class:`ClassFolderSplit` datasets of items (uint8 (3,size,size), int); ``classes``, ``num_classes``."""

    def __init__(self, root: str | Path, size: int = 224, seed: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.root, self.size = Path(root), size
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise DataError(f"class folder tree {str(self.root)!r} has no folder {split!r}; expected {LAYOUT}")
        self.classes = _subfolders(self.root / "train")
        if not self.classes:
            raise DataError(f"{str(self.root / 'train')!r} has no class folders; expected {LAYOUT}")
        self.num_classes = len(self.classes)
        label = {name: i for i, name in enumerate(self.classes)}
        val = _subfolders(self.root / "val")
        unknown = [name for name in val if name not in label]
        if unknown:
            raise DataError(f"val class {unknown[0]!r} ({str(self.root / 'val' / unknown[0])!r}) is not among the "
                            f"{self.num_classes} train classes of {str(self.root)!r}")
        if not val:
            raise DataError(f"{str(self.root / 'val')!r} has no class folders; expected {LAYOUT}")
        self.train = self._split("train", self.classes, label, seed, augments=True)
        self.val = self._split("val", val, label, seed, augments=False)

    def _split(self, split: str, names: list[str], label: dict[str, int], seed: int, augments: bool):
        samples = [(f, label[name]) for name in names for f in _class_images(self.root / split / name)]
        return ClassFolderSplit(samples, self.classes, self.size, seed, augments)
