"""Checkpoints: written atomically (temp file, fsync, rename), read back with clear errors.

A checkpoint is a dict: ``model``, ``head`` (state dicts), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (completed epochs), ``step`` (completed optimiser steps), ``rng`` (torch CPU/CUDA generator
states), ``config`` (the resolved config as a dict), ``role`` ("teacher", "assistant" or "student"; before
the method registry, a student's method), ``method`` (its spec, ``base`` for the teacher) and
``method_state`` (the method's state dict: HORKD's class centres), and
``arch``/``variant``/``embedding_size``/``num_classes`` so that a reuse of another architecture fails
early with a message instead of a state-dict mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .atomic import replacing


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` so that a crash leaves either the old file or the new one."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; raise CheckpointError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds for a corrupt or truncated file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path} is not an askd checkpoint (no 'model'/'arch' entries)")
    return ckpt


def load_model(
    path: str | Path, device="cpu", backend: str | None = None, expect: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The embedding model of a checkpoint (its arch, variant and embedding size), in eval mode without grad,
    on ``device``; and the checkpoint dict. ``backend`` as in ``askd.models.create``. One that does not
    describe a known model, or whose entries differ from ``expect`` (e.g. ``{"arch": "ir50_cbam"}``), raises
    CheckpointError before anything is built."""
    from . import models  # here, not at the top: the models need not be built to read or write a checkpoint

    ckpt = load(path)
    missing = [k for k in ("variant", "embedding_size") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an askd checkpoint (no {'/'.join(missing)} entries)")
    wrong = {k: v for k, v in (expect or {}).items() if ckpt.get(k) != v}
    if wrong:
        have = ", ".join(f"{k} {ckpt.get(k)}" for k in wrong)
        want = ", ".join(f"{k} {v}" for k, v in wrong.items())
        raise CheckpointError(f"checkpoint {path} has {have}, but this run uses {want}")
    try:
        model = models.create(ckpt["arch"], ckpt["variant"], ckpt["embedding_size"], backend=backend)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:  # unknown arch/variant; a state dict of another shape
        # load_state_dict lists every bad key over many lines: one line, cut short, for the error message
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:300] + " ..."
        target = f"{ckpt['arch']}/{ckpt['variant']}"
        raise CheckpointError(f"checkpoint {path} does not load into {target}: {reason}") from None
    return model.to(device).eval().requires_grad_(False), ckpt


def describe_role(ckpt: dict[str, Any]) -> str:
    """What a checkpoint's model was trained as, in words: ``teacher``, ``student askd+kd``,
    ``assistant horkd``; a checkpoint from before the method registry recorded only a student's method."""
    role, method = ckpt.get("role"), ckpt.get("method")
    if role in ("student", "assistant"):
        return f"{role} {method}"
    if role in ("teacher", None):
        return role or "no role recorded"
    return f"student {role}"


def rng_state() -> dict[str, Any]:
    """The generator states a resumed run must restore to continue bit-exactly (dropout draws)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
