"""Loader for the compiled extension ``askd._C``: imports it at most once and keeps why it failed.

Nothing here raises at import time, so ``askd`` stays usable (pure-torch backend) without a build.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

HINT = "build it with: pip install --no-build-isolation -e ."

_tried = False
_module: ModuleType | None = None
_error: str | None = None


def load() -> ModuleType | None:
    """``askd._C`` (its ops then live in ``torch.ops.askd``), or None if it cannot be imported."""
    global _tried, _module, _error
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("askd._C")
        # any failure (not built, ABI mismatch, undefined symbol) just means "no extension"
        except Exception as exc:
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def error() -> str | None:
    """Why ``askd._C`` could not be imported, or None if it loaded."""
    load()
    return _error


def build_info() -> str:
    """One line on how ``askd._C`` was built (compiler, OpenMP, torch, CUDA)."""
    if load() is None:
        raise RuntimeError(f"askd._C is not available ({_error}); {HINT}")
    return torch.ops.askd.build_info()
