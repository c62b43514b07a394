"""Data: LR synthesis, the embedded synthetic face set, image folders, RecordIO packs, verification .bin files."""

import warnings

from .degrade import degrade, low_res_size
from .folders import DataError, ImageFolderFaces, list_identities
from .insightface import RecordDataset
from .recordio import RecordReader, RecordWriter
from .synthetic import SyntheticFaces
from .verification_bin import make_bin, pair_indices, read_bin, read_bin_tensors, write_bin

__all__ = [
    "DataError",
    "ImageFolderFaces",
    "RecordDataset",
    "RecordReader",
    "RecordWriter",
    "SyntheticFaces",
    "degrade",
    "list_identities",
    "low_res_size",
    "make_bin",
    "pair_indices",
    "read_bin",
    "read_bin_tensors",
    "write_bin",
]


def __getattr__(name: str):
    """``lr_size``, the old name of :func:`low_res_size` (renamed so that "lr" means only the learning rate)."""
    if name != "lr_size":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("askd.data.lr_size is deprecated; use askd.data.low_res_size", DeprecationWarning, stacklevel=2)
    return low_res_size
