"""How a fused op finds the code of a backend: one rule for every op.

A backend of op ``name`` is a namespace with the contract's ``forward`` and ``backward`` (and, for some,
``forward_grad``): ``torch`` the op's written-out references, ``ext`` the compiled ops ``torch.ops.askd.<name>_*``,
``triton`` the module :data:`askd.backend.FUSED_OPS` names (``askd.kernels.<name>``, imported on first use, so
importing :mod:`askd.ops` never imports Triton).
"""

from __future__ import annotations

import importlib
from types import ModuleType, SimpleNamespace

import torch

from .. import _ext
from ..backend import BACKENDS as NAMES
from ..backend import FUSED_OPS

BACKENDS = tuple(name for name in NAMES if name != "auto")  # what an op runs; auto resolves to one of them
PARTS = ("forward", "backward", "forward_grad")


def compiled_ops(name: str) -> SimpleNamespace:
    """The compiled ops of ``name`` that ``askd._C`` registers, as attributes (none without the extension)."""
    if _ext.load() is None:
        return SimpleNamespace()
    ops = torch.ops.askd
    return SimpleNamespace(**{part: getattr(ops, f"{name}_{part}") for part in PARTS if hasattr(ops, f"{name}_{part}")})


def backend_impl(name: str, backend: str, reference: SimpleNamespace, compiled: SimpleNamespace):
    """The namespace (or module) with ``forward`` / ``backward`` of op ``name`` for ``backend``."""
    if backend == "torch":
        return reference
    if backend == "ext":
        return compiled
    if backend == "triton":
        return triton_module(name)
    raise ValueError(f"fused op {name} has no backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def triton_module(name: str) -> ModuleType:
    return importlib.import_module(FUSED_OPS[name][0])
