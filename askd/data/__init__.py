"""Data: LR synthesis, the embedded synthetic face set, image folders, RecordIO packs, verification .bin files."""

from .degrade import degrade, lr_size
from .folders import DataError, ImageFolderFaces, list_identities
from .recordio import RecordDataset, RecordReader, RecordWriter
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
    "lr_size",
    "make_bin",
    "pair_indices",
    "read_bin",
    "read_bin_tensors",
    "write_bin",
]


def __getattr__(name: str):
    # imported on first use, so that `python -m askd.data.synthetic` does not load that module twice
    if name == "SyntheticFaces":
        from .synthetic import SyntheticFaces

        return SyntheticFaces
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
