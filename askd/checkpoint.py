"""Checkpoints: written atomically (temp file, fsync, rename), read back with clear errors.

A phase's checkpoint is ``checkpoint.pt``, its newest. With ``keep_checkpoints`` K > 1 the last K are also kept
as ``checkpoint-<step>.pt`` (``checkpoint.pt`` is a hard link to the newest of them), and a resume falls back
to an older one when the newest does not load (:func:`load_newest`).

A checkpoint is a dict: ``model``, ``head`` (state dicts), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (completed epochs), ``step`` (completed optimiser steps), ``rng`` (torch CPU/CUDA generator
states), ``config`` (the resolved config as a dict), ``role`` ("teacher", "assistant" or "student"; before
the method registry, a student's method), ``method`` (its spec, ``base`` for the teacher) and
``method_state`` (the method's state dict: HORKD's class centres), and
``arch``/``variant``/``embedding_size``/``num_classes`` so that a reuse of another architecture fails
early with a message instead of a state-dict mismatch; ``task`` (face or classify) and ``model_kwargs`` (what
``askd.models.create`` needs besides: a classifier's ``num_classes`` and ``stem``).
"""

from __future__ import annotations

import os
import shutil
import sys
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


def numbered(path: str | Path, step: int) -> Path:
    """``.../checkpoint.pt`` -> ``.../checkpoint-00001200.pt``: the checkpoint of optimiser step ``step``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{step:08d}{path.suffix}")


def kept(path: str | Path) -> list[Path]:
    """The numbered checkpoints beside ``path`` (see :func:`numbered`), newest (highest step) first."""
    path = Path(path)
    found = []
    for p in path.parent.glob(f"{path.stem}-*{path.suffix}"):
        step = p.name[len(path.stem) + 1: len(p.name) - len(path.suffix)]
        if step.isdigit():
            found.append((int(step), p))
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(obj: Any, path: str | Path, step: int, keep: int = 1) -> None:
    """Write ``obj`` as ``path``, atomically. With ``keep`` > 1 it is written as ``numbered(path, step)`` and
    ``path`` is replaced by a hard link to it (a copy where the filesystem has none), and only the newest
    ``keep`` numbered files stay; with ``keep`` 1 no numbered file stays."""
    path = Path(path)
    if keep > 1:
        step_file = numbered(path, step)
        save_atomic(obj, step_file)
        with replacing(path) as tmp:
            tmp.unlink()
            try:
                os.link(step_file, tmp)
            except OSError:
                shutil.copyfile(step_file, tmp)
    else:
        save_atomic(obj, path)
    for old in kept(path)[keep if keep > 1 else 0:]:
        old.unlink(missing_ok=True)


def remove_checkpoints(path: str | Path) -> None:
    """Delete ``path`` and its numbered checkpoints (a phase started afresh)."""
    for p in (Path(path), *kept(path)):
        p.unlink(missing_ok=True)


def load_newest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of ``path`` that loads, and its file: ``path`` itself, else the numbered ones,
    newest first. A file that does not load is named on stderr with the reason before the next older one is
    tried; CheckpointError naming every file and reason when none loads."""
    candidates = [p for p in (Path(path), *kept(path)) if p.is_file()]
    if not candidates:
        raise CheckpointError(f"checkpoint not found: {path}")
    failures = []
    for i, p in enumerate(candidates):
        try:
            return load(p), p
        except CheckpointError as e:
            failures.append(str(e))
            if i + 1 < len(candidates):
                print(f"askd: {e}; trying the older {candidates[i + 1].name}", file=sys.stderr)
    raise CheckpointError("no checkpoint loads: " + "; ".join(failures))


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
        model = models.create(ckpt["arch"], ckpt["variant"], ckpt["embedding_size"], backend=backend,
                              **ckpt.get("model_kwargs", {}))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:  # unknown arch/variant; a state dict of another shape
        # load_state_dict lists every bad key over many lines: one line, cut short, for the error message
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:300] + " ..."
        target = f"{ckpt['arch']}/{ckpt['variant']}"
        raise CheckpointError(f"checkpoint {path} does not load into {target}: {reason}") from None
    return model.to(device).eval().requires_grad_(False), ckpt


def require_face(ckpt: dict[str, Any], path: str | Path, tool: str) -> None:
    """CheckpointError unless the checkpoint holds a face model (checkpoints of older versions all do): ``tool``
    (askd.eval, askd.export) embeds faces of 112 px."""
    task = ckpt.get("task", "face")
    if task != "face":
        raise CheckpointError(f"{path} holds a model of task {task}; {tool} takes face models (image classifiers are "
                              f"evaluated by python -m askd.train --task classify)")


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
    """The generator states a resumed run must restore to continue bit-exactly (dropout draws): the CPU's and
    the current CUDA device's. Every process of a run draws the same (askd.nn.dropout), so rank 0's states
    fit any process of any world size."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state; this process's device's
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)
