"""Data: LR synthesis, the embedded synthetic face set, image folders."""

from .degrade import degrade, lr_size
from .folders import ImageFolderFaces, list_identities

__all__ = ["ImageFolderFaces", "SyntheticFaces", "degrade", "list_identities", "lr_size"]


def __getattr__(name: str):
    # imported on first use, so that `python -m askd.data.synthetic` does not load that module twice
    if name == "SyntheticFaces":
        from .synthetic import SyntheticFaces

        return SyntheticFaces
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
