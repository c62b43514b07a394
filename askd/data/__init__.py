"""Data: LR synthesis, the embedded synthetic face set, image folders, RecordIO packs, verification .bin files."""

from .degrade import degrade, lr_size
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
    "lr_size",
    "make_bin",
    "pair_indices",
    "read_bin",
    "read_bin_tensors",
    "write_bin",
]

