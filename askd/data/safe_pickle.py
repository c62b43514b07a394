"""Loading pickles of numpy data without running a file's code: ``load(path, allowed, where, holds)`` and
``numpy_globals()``, shared by the CIFAR reader and the verification .bin reader.

Unpickling calls whatever globals a file names, so the unpickler here resolves only those of ``allowed``
((module, name) -> object) and refuses any other with a DataError before it is called. ``encoding="bytes"``
turns Python 2 strings into bytes, as both formats need. A corrupt file fails inside the unpickler in many ways
(EOFError, UnpicklingError, KeyError, TypeError from a numpy rebuild, ...); with the globals restricted none of
them can come from the file's own code, so each becomes a DataError that says so.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .folders import DataError


def numpy_globals(scalars: bool = False) -> dict[tuple[str, str], object]:
    """What pickled numpy arrays (and dtypes; ``scalars``: also numpy scalars and protocol-5 buffers) name, under
    numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) paths."""
    # Taken from numpy's own reducers, so that the deprecated numpy.core path is never imported.
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray", "_reconstruct"] = np.zeros(1).__reduce__()[0]
        if scalars:
            allowed[f"{core}.multiarray", "scalar"] = np.bool_(True).__reduce__()[0]
            allowed[f"{core}.numeric", "_frombuffer"] = np.zeros(1).__reduce_ex__(5)[0]
    return allowed


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict[tuple[str, str], object], where: str, holds: str):
        super().__init__(file, encoding="bytes")
        self.allowed, self.where, self.holds = allowed, where, holds

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[module, name]
        except KeyError:
            raise DataError(f"refusing to load global {module}.{name} from {self.where}: {self.holds}") from None


def load(path: Path, allowed: dict[tuple[str, str], object], where: str, holds: str) -> object:
    """The object pickled in the file ``path``, resolving only the globals of ``allowed``. Errors name the file
    as ``where`` ("CIFAR file '...'") and say what it may hold (``holds``)."""
    with open(path, "rb") as f:
        try:
            return _Unpickler(f, allowed, where, holds).load()
        except DataError:
            raise
        except Exception as err:
            reason = " ".join(str(err).split())  # some unpickler messages span lines
            raise DataError(f"{where} is not a readable pickle: {type(err).__name__}: {reason}") from err
