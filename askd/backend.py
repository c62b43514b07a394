"""Backend selection for the fused ops: which of torch / triton / ext can run on a device, and which to use.

``torch`` is the plain PyTorch implementation (each op's written-out reference) and always works.
``triton`` uses the kernels of the ``askd.kernels`` package (the repository's ``kernels/`` folder), ``ext``
the ops that ``askd._C`` registers in ``torch.ops.askd`` (:data:`FUSED_OPS` names both for each fused op).
A backend counts as available once it implements every fused op for the device type.

One vocabulary throughout: the ops are ``cbam`` and ``cosine_distill`` (the sum of the maps' cosine
distances) in :mod:`askd.ops`, in ``askd.kernels`` and in the compiled extension;
``askd.losses.attention_distill_loss`` is the A-SKD loss built on ``cosine_distill``; the backends are
``torch``, ``triton`` and ``ext`` everywhere.
``auto`` picks the first available backend in :data:`AUTO_ORDER` and always ends at ``torch``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("torch", "triton", "ext", "auto")
# fused op -> (its Triton module, its compiled ops in torch.ops.askd)
FUSED_OPS = {
    "cbam": ("askd.kernels.cbam", ("cbam_forward", "cbam_backward")),
    "cosine_distill": ("askd.kernels.cosine_distill", ("cosine_distill_forward", "cosine_distill_backward")),
}
ENV_VAR = "ASKD_BACKEND"
# Fastest first, torch last so auto never fails. CPU: ext measured faster than torch (bench/results); Triton
# on a CPU is the interpreter, a testing mode, so auto never picks it there. CUDA: not measured yet (no GPU
# run so far); Triton first as DESIGN.md plans.
AUTO_ORDER = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on the given device."""


def check_name(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`, else a ValueError listing them."""
    return _validate(name, "the argument")


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}; valid backends: {', '.join(BACKENDS)}")
    return name


def default_backend() -> str:
    """``$ASKD_BACKEND`` if set (validated), else ``"torch"``."""
    name = os.environ.get(ENV_VAR)
    return _validate(name, f"${ENV_VAR}") if name else "torch"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _triton_kernel_problems() -> dict[str, str]:
    """op -> problem, for each fused op without an importable ``askd.kernels.<op>`` module."""
    problems = {}
    for op, (name, _) in FUSED_OPS.items():
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # no `askd.kernels` package at all
            spec = None
        if spec is None:
            problems[op] = "missing"
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            problems[op] = f"{name} fails to import ({type(exc).__name__}: {exc})"
    return problems


def _triton_reason(device_type: str) -> str | None:
    reason = _triton_import_error()
    if reason:
        return reason
    problems = _triton_kernel_problems()
    if len(problems) == len(FUSED_OPS) and set(problems.values()) == {"missing"}:
        return "no Triton kernels in this build yet"
    if problems:
        return "; ".join(f"{op}: {problem}" for op, problem in problems.items())
    if device_type != "cuda" and not (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU"
    return None


@functools.cache
def _ext_has(op: str, device_type: str) -> bool:
    # a registered schema is not enough: the dispatcher must find a kernel for this device's dispatch key.
    # Cached: resolution runs in every CBAM forward, and the extension's kernels do not change once loaded
    key = torch._C._dispatch_key_for_device(device_type)
    return all(
        hasattr(torch.ops.askd, name) and torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"askd::{name}", key)
        for name in FUSED_OPS[op][1]
    )


def _ext_reason(device_type: str) -> str | None:
    if _ext.load() is None:
        return f"askd._C is not importable ({_ext.error()}); {_ext.HINT}"
    missing = [op for op in FUSED_OPS if not _ext_has(op, device_type)]
    if missing:
        return f"askd._C has no {device_type} kernels for: {', '.join(missing)}"
    return None


def availability(device: str | torch.device) -> dict[str, str | None]:
    """For torch, triton and ext: None if it can run the fused ops on ``device``'s type, else the reason."""
    device_type = torch.device(device).type
    return {"torch": None, "triton": _triton_reason(device_type), "ext": _ext_reason(device_type)}


def _auto_order(device_type: str) -> tuple[str, ...]:
    return AUTO_ORDER.get(device_type, AUTO_ORDER["cpu"])


def resolve(requested: str | None, device: str | torch.device) -> str:
    """The backend to run on ``device``: ``requested`` > ``$ASKD_BACKEND`` > ``"torch"``.

    ``auto`` never fails; an explicit backend that cannot run raises :class:`BackendUnavailable`.
    """
    name = default_backend() if requested is None else _validate(requested, "the argument")
    device_type = torch.device(device).type
    reasons = availability(device_type)
    if name == "auto":
        return next(b for b in _auto_order(device_type) if reasons[b] is None)
    if reasons[name] is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on device {str(device)!r}: {reasons[name]}")
    return name


@torch.compiler.assume_constant_result
def resolve_constant(requested: str | None, device_type: str) -> str:
    """:func:`resolve` for module forwards: torch.compile calls it once while tracing and keeps the answer."""
    return resolve(requested, device_type)


def describe_fallback(device: str | torch.device) -> str:
    """One line: what ``auto`` resolves to on ``device`` and why the backends before it were skipped."""
    device_type = torch.device(device).type
    reasons = availability(device_type)
    skipped = []
    for name in _auto_order(device_type):
        if reasons[name] is None:
            break
        skipped.append(f"{name} skipped: {reasons[name]}")
    return "; ".join([f"auto -> {name} on {device_type}", *skipped])
