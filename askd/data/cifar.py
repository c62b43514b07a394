"""CIFAR-10 and CIFAR-100 from the python pickles of the original archives: ``read_cifar(root) -> CifarData``,
``is_cifar(path)``.

Layouts (``root`` is one of these folders, or holds exactly one of them):
  ``cifar-10-batches-py/``: data_batch_1 .. data_batch_5 (train, 50,000 images), test_batch (10,000) and
      batches.meta (``label_names``, 10); labels under ``labels``;
  ``cifar-100-python/``: train (50,000), test (10,000) and meta (``fine_label_names``, 100); labels under
      ``fine_labels`` (the 20 coarse superclasses are not used).
Each file is a Python 2 pickle (protocol 2) of a dict with bytes keys: ``data`` a numpy uint8 array (N, 3072),
each row an image's red, green and blue 32x32 planes, row-major; the labels a list of N ints. Text comes out as
bytes with ``encoding="bytes"`` and is decoded as UTF-8.

Unpickling can call anything a file names, so a restricted unpickler resolves only the three globals such a
file references to rebuild its array, ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
``numpy.dtype`` (also under numpy 2's ``numpy._core`` spelling); any other global is a DataError before it is
called. What loads is then checked (a dict, ``data`` uint8 (N, 3072), N labels in range) and anything else is a
DataError naming the file.

``CifarData``: ``train`` and ``test`` :class:`CifarDataset`, items (image uint8 (3,32,32) RGB, label int). The
training view (``train[(i, epoch)]``, see askd.data.views) is the standard CIFAR
augmentation: zero-pad 4 px on every side, then a random 32x32 crop, drawn from (seed, epoch, i); the
horizontal flip is the training loop's. The evaluation view is the image as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import safe_pickle
from .folders import DataError
from .views import ViewDataset, view_generator

SIDE = 32
PAD = 4  # the standard CIFAR augmentation: pad 4, crop 32


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str
    labels_key: str
    num_classes: int


LAYOUTS = (
    _Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
            "batches.meta", "label_names", "labels", 10),
    _Layout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_label_names", "fine_labels", 100),
)
EXPECTED = ("cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or cifar-100-python/ "
            "(train, test, meta)")


HOLDS = "it may hold only a dict of numpy uint8 arrays, lists, strings and ints"


def _load(path: Path) -> dict[str, object]:
    """The dict pickled in ``path``, keys decoded to str; DataError if missing, unreadable or not a dict."""
    if not path.is_file():
        raise DataError(f"CIFAR file {str(path)!r} is missing; expected {EXPECTED}")
    obj = safe_pickle.load(path, safe_pickle.numpy_globals(), f"CIFAR file {str(path)!r}", HOLDS)
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file {str(path)!r} holds a {type(obj).__name__}; expected a dict")
    return {_text(key, path, "a key"): value for key, value in obj.items()}


def _text(value, path: Path, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            pass
    raise DataError(f"CIFAR file {str(path)!r}: {what} is {value!r}; expected a string")


def _field(d: dict[str, object], key: str, path: Path):
    if key not in d:
        raise DataError(f"CIFAR file {str(path)!r} has no {key!r} entry (it has {sorted(d)})")
    return d[key]


def _batch(path: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,3,32,32), labels int64 (N,)) of one data file, checked."""
    d = _load(path)
    data, labels = _field(d, "data", path), _field(d, layout.labels_key, path)
    row = 3 * SIDE * SIDE
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == row):
        got = f"an array {data.shape} {data.dtype}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DataError(f"CIFAR file {str(path)!r}: 'data' is {got}; expected a uint8 array (N, {row})")
    if not isinstance(labels, list) or len(labels) != len(data):
        got = f"of length {len(labels)}" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise DataError(f"CIFAR file {str(path)!r}: {layout.labels_key!r} is {got}; expected a list of "
                        f"{len(data)} ints (one per image)")
    bad = next((i for i, y in enumerate(labels) if type(y) is not int or not 0 <= y < layout.num_classes), None)
    if bad is not None:
        raise DataError(f"CIFAR file {str(path)!r}: {layout.labels_key}[{bad}] is {labels[bad]!r}; expected an int "
                        f"in [0, {layout.num_classes})")
    return data.reshape(-1, 3, SIDE, SIDE), np.array(labels, dtype=np.int64)


def _classes(path: Path, layout: _Layout) -> list[str]:
    names = _field(_load(path), layout.names_key, path)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        got = f"of length {len(names)}" if isinstance(names, list) else f"a {type(names).__name__}"
        raise DataError(f"CIFAR file {str(path)!r}: {layout.names_key!r} is {got}; expected a list of "
                        f"{layout.num_classes} class names")
    return [_text(name, path, f"{layout.names_key}[{i}]") for i, name in enumerate(names)]


def _candidates(root: Path) -> list[tuple[Path, _Layout]]:
    """The CIFAR folders ``root`` is (by name or by its meta and test files) or holds."""
    for layout in LAYOUTS:
        if root.name == layout.folder or ((root / layout.meta).is_file() and (root / layout.test).is_file()):
            return [(root, layout)]
    return [(root / layout.folder, layout) for layout in LAYOUTS if (root / layout.folder).is_dir()]


def is_cifar(path: str | Path) -> bool:
    """Whether ``path`` is, or holds, a CIFAR-10 or CIFAR-100 python folder (see the module docstring)."""
    return Path(path).is_dir() and bool(_candidates(Path(path)))


class CifarDataset(ViewDataset):
    """CIFAR images: items (uint8 (3,32,32), int label); the training view pads 4 px and crops 32 when ``train``.

    images uint8 (N,3,32,32), labels int64 (N,), ``classes`` the N class names in label order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int = 0,
                 train: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, SIDE, SIDE):
            raise ValueError(f"images must be uint8 (N,3,{SIDE},{SIDE}), got {tuple(images.shape)} {images.dtype}")
        if labels.dtype != torch.int64 or labels.shape != (len(images),):
            raise ValueError(f"labels must be int64 ({len(images)},), got {tuple(labels.shape)} {labels.dtype}")
        self.images, self.labels, self.classes = images, labels, list(classes)
        self.num_classes, self.size, self.seed, self.augments = len(self.classes), SIDE, seed, train

    def __len__(self) -> int:
        return len(self.images)

    def eval_view(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), int(self.labels[index])

    def train_view(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        top, left = torch.randint(0, 2 * PAD + 1, (2,), generator=view_generator(self.seed, epoch, index)).tolist()
        padded = F.pad(self.images[index], (PAD, PAD, PAD, PAD))
        return padded[:, top:top + SIDE, left:left + SIDE].contiguous(), int(self.labels[index])


@dataclass
class CifarData:
    """A CIFAR set: ``train`` (augments) and ``test`` datasets, and its ``name`` ("CIFAR-10" or "CIFAR-100")."""

    train: CifarDataset
    test: CifarDataset
    name: str


def read_cifar(root: str | Path, seed: int = 0) -> CifarData:
    """The CIFAR set at ``root`` (a cifar-10-batches-py or cifar-100-python folder, or a folder holding one);
    ``seed`` seeds the training views. Every problem is a DataError naming the path."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"CIFAR root {str(path)!r} is not a folder; expected {EXPECTED}")
    found = _candidates(path)
    if len(found) != 1:
        what = "holds both CIFAR-10 and CIFAR-100; name one of the two folders" if found else f"holds no {EXPECTED}"
        raise DataError(f"CIFAR root {str(path)!r} {what}")
    folder, layout = found[0]
    classes = _classes(folder / layout.meta, layout)

    def dataset(names: tuple[str, ...], train: bool) -> CifarDataset:
        batches = [_batch(folder / name, layout) for name in names]
        # concatenate copies, also the one batch of CIFAR-100: arrays unpickled from bytes are read-only
        images, labels = (torch.from_numpy(np.concatenate(parts)) for parts in zip(*batches, strict=True))
        return CifarDataset(images, labels, classes, seed, train)

    return CifarData(dataset(layout.train, True), dataset((layout.test,), False), layout.name)
