"""The TinyFace test set on disk: its folder layout, file lists with identity labels, and its images.

TinyFace (Cheng et al., ACCV 2018; 3,728 probes, 4,443 Gallery_Match images, 153,428 distractors, 2,569
test identities). Layout: ``ROOT[/Testing_Set]/{Probe,Gallery_Match,<distractors>}``, where the distractor
folder is ``Gallery_Distractor`` (the release's spelling) or ``Gallery_Disctractor`` (a misspelled copy);
exactly one must exist. Images are found recursively (some copies split the distractors into sub-folders),
ordered by path; the gallery is Gallery_Match then the distractors, as in the official code, so a tie
between a match and a distractor goes to the match. A file's identity is the decimal number before the
first underscore of its name (``1_3.jpg`` -> 1, as the release's ``[PersonID]_[ImageName].jpg``);
distractors get ``DISTRACTOR_LABEL`` whatever their names. Images, natively about 20x16 px, are resized as
:func:`askd.data.folders.load_image` does (shorter side to ``size``, bilinear, centre crop), the bilinear
resize of the A-SKD paper; pre-aligned 112x112 copies pass through unchanged at size 112.

Shapes: labels int64 (P,) for the probes and (G,) for the gallery; images uint8 (3,size,size) each, stacked
(N,3,size,size) by :func:`load_tinyface`. The rank-k / mAP protocol on them is :mod:`askd.eval.identification`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .folders import EXTENSIONS, DataError, load_image

DISTRACTOR_LABEL = -1
DISTRACTOR_FOLDERS = ("Gallery_Distractor", "Gallery_Disctractor")
TINYFACE_LAYOUT = f"ROOT[/Testing_Set]/{{Probe,Gallery_Match,{'|'.join(DISTRACTOR_FOLDERS)}}}/**/<id>_<name>.<ext>"


@dataclass(frozen=True)
class TinyFaceLists:
    """A TinyFace test set's files: probes, then the gallery (Gallery_Match then distractors), with labels."""

    probe_paths: list[Path]
    probe_labels: torch.Tensor  # int64 (P,)
    gallery_paths: list[Path]
    gallery_labels: torch.Tensor  # int64 (G,), DISTRACTOR_LABEL for the distractors
    distractor_folder: str  # the spelling found: one of DISTRACTOR_FOLDERS


def identity_of(path: Path) -> int:
    """The identity in a TinyFace file name: the decimal number before the first underscore, or a DataError."""
    head, underscore, _ = path.stem.partition("_")
    if not (underscore and head.isascii() and head.isdigit()):
        raise DataError(f"cannot read an identity from {str(path)!r}; expected <identity number>_<name>.<ext>")
    return int(head)


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, sorted by path, or a DataError when there are none."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in EXTENSIONS and f.is_file())
    if not files:
        raise DataError(f"no images under {str(folder)!r}; expected {TINYFACE_LAYOUT}")
    return files


def _testing_set(root: str | Path) -> tuple[Path, str]:
    """The folder holding Probe, Gallery_Match and the distractors, and the distractor folder's name."""
    base = Path(root)
    if (base / "Testing_Set").is_dir():
        base = base / "Testing_Set"
    distractors = [name for name in DISTRACTOR_FOLDERS if (base / name).is_dir()]
    missing = [name for name in ("Probe", "Gallery_Match") if not (base / name).is_dir()]
    if not distractors:
        missing.append(" or ".join(DISTRACTOR_FOLDERS))
    if missing:
        raise DataError(f"{str(base)!r} is not a TinyFace test set: missing {missing}; expected {TINYFACE_LAYOUT}")
    if len(distractors) > 1:
        raise DataError(f"{str(base)!r} holds both {distractors}; keep exactly one distractor folder")
    return base, distractors[0]


def tinyface_lists(root: str | Path) -> TinyFaceLists:
    """The files and labels of the TinyFace test set at ``root`` (the tinyface folder or its Testing_Set).

    Raises a DataError naming what was expected when a folder is missing or empty or a name has no identity.
    """
    base, distractor_folder = _testing_set(root)
    probes, matches = _image_files(base / "Probe"), _image_files(base / "Gallery_Match")
    distractors = _image_files(base / distractor_folder)
    gallery_labels = [identity_of(f) for f in matches] + [DISTRACTOR_LABEL] * len(distractors)
    return TinyFaceLists(
        probe_paths=probes,
        probe_labels=torch.tensor([identity_of(f) for f in probes], dtype=torch.int64),
        gallery_paths=matches + distractors,
        gallery_labels=torch.tensor(gallery_labels, dtype=torch.int64),
        distractor_folder=distractor_folder,
    )


def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)  # filled in place: one copy in memory
    for i, path in enumerate(paths):
        images[i] = load_image(path, size)
    return images


def load_tinyface(root: str | Path, size: int = 112):
    """All TinyFace test images in memory: ``(probe uint8 (P,3,size,size), probe labels int64 (P,), gallery
    uint8 (G,3,size,size), gallery labels int64 (G,))``, the gallery holding the distractors (label -1).

    The full set is ~158k images (5.9 GB at size 112); :func:`askd.eval.identification.evaluate_tinyface` streams
    them instead.
    """
    lists = tinyface_lists(root)
    return (_load_images(lists.probe_paths, size), lists.probe_labels,
            _load_images(lists.gallery_paths, size), lists.gallery_labels)


class ImageFiles(Dataset):
    """uint8 (3, size, size) images of ``paths``, decoded on demand (in DataLoader workers if asked)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size)
