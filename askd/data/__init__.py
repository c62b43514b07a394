"""Data: LR synthesis, the embedded synthetic face set, image folders, RecordIO packs, verification .bin files;
for image classification the CIFAR pickles, ImageNet-style class folders and the embedded shapes set."""

import warnings

from .cifar import CifarData, CifarDataset, is_cifar, read_cifar
from .classfolders import ClassFolders, ClassFolderSplit, is_class_folders
from .degrade import degrade, low_res_size
from .folders import DataError, ImageFolderFaces, list_identities
from .insightface import RecordDataset
from .recordio import RecordReader, RecordWriter
from .shapes import ShapesDataset
from .synthetic import SyntheticFaces
from .verification_bin import make_bin, pair_indices, read_bin, read_bin_tensors, write_bin
from .views import ViewDataset

__all__ = [
    "CifarData",
    "CifarDataset",
    "ClassFolderSplit",
    "ClassFolders",
    "DataError",
    "ImageFolderFaces",
    "RecordDataset",
    "RecordReader",
    "RecordWriter",
    "ShapesDataset",
    "SyntheticFaces",
    "ViewDataset",
    "degrade",
    "is_cifar",
    "is_class_folders",
    "list_identities",
    "low_res_size",
    "make_bin",
    "pair_indices",
    "read_bin",
    "read_bin_tensors",
    "read_cifar",
    "write_bin",
]


def __getattr__(name: str):
    """``lr_size``, the old name of :func:`low_res_size` (renamed so that "lr" means only the learning rate)."""
    if name != "lr_size":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("askd.data.lr_size is deprecated; use askd.data.low_res_size", DeprecationWarning, stacklevel=2)
    return low_res_size
