"""The run: HR teacher -> frozen -> [HORKD's assistant] -> one LR student per method -> evaluation.

One run folder (``--out``) holds ``config.toml`` (the resolved config), ``teacher/``, one
``student_<method>/`` per method (and ``assistant_<method>/`` with ``--assistant``), each with
``checkpoint.pt`` and ``metrics.jsonl`` (:mod:`askd.train.fit`), and at the end ``results.json`` and
``results.md``: 10-fold verification accuracy of the teacher on HR and LR and of every student on LR, and
the per-block Pearson correlation of teacher (HR) and student (LR) maps.

A run folder is used by one run at a time (``askd.runlock``). One that holds checkpoints is continued only
with ``--resume``; a new run there is refused, as is ``--resume`` of a folder with nothing to resume.

Under torchrun (README "Many GPUs, many nodes") every process runs this pipeline; rank 0 alone holds the lock
and writes the config, logs, checkpoints and results (the run folder must be on a filesystem every node
sees: the others read the checkpoints between phases and on resume). A group that torchrun restarts after a
failure resumes from the last checkpoints without ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import backend, distributed, hostmem, runlock
from ..atomic import replacing
from ..checkpoint import CheckpointError, load_model
from ..config import Config, ConfigError, to_toml
from ..data.sources import TrainData, build_data
from ..devices import resolve_device
from ..distributed import SINGLE, World
from ..losses import build, registry
from ..nn import fold_batchnorms
from .fit import fit
from .tasks import task_of
from .trainer import Phase, compile_model, freeze

Frozen = tuple[torch.nn.Module, torch.nn.Module]  # a model and its head


def teacher_forward(cfg: Config, teacher: torch.nn.Module):
    """What the students' steps (and an assistant's) run the frozen teacher through: with ``fold_teacher`` a copy
    whose BatchNorms after a convolution or Linear are folded into it (:func:`askd.nn.fold_batchnorms`; the same
    outputs up to float rounding, fewer passes over the activations), and with ``--compile`` that compiled too,
    once for every student. Measured with bench/test_train_step.py (B=64 ir_tiny_cbam, 2-core Sapphire Rapids
    Xeon): a --fused --compile step 1.13x faster with bf16 autocast than with the student alone compiled, and as
    fast in float32, for ~10 s more compilation. Evaluation and the checkpoints keep the plain module."""
    model = fold_batchnorms(teacher) if cfg.fold_teacher else teacher
    return compile_model(model) if cfg.compile else model


def load_frozen(path: Path, cfg: Config, arch: str, device: torch.device) -> Frozen:
    """Model and head of a checkpoint of ``arch`` (and the config's task, variant and embedding size), frozen,
    with the run's kernels and memory format; a checkpoint of anything else ends clearly."""
    expect = {"arch": arch, "variant": cfg.variant, "embedding_size": cfg.embedding_size}
    model, ckpt = load_model(path, device, backend=cfg.kernel_backend(), expect=expect)
    if ckpt.get("task", "face") != cfg.task:
        raise CheckpointError(f"checkpoint {path} is of task {ckpt.get('task', 'face')}, this run's is {cfg.task}")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if "head" not in ckpt or "num_classes" not in ckpt:
        # e.g. the authors' network converted without its margin: the student phase runs the teacher's head
        raise CheckpointError(f"{path}: no ArcFace head in this checkpoint (python -m askd.convert takes --margin)")
    head = task_of(cfg).head(cfg, model, ckpt["num_classes"]).to(device)
    head.load_state_dict(ckpt["head"])
    return freeze(model, head)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked: a new run into an earlier run's checkpoints, or a resume of
    a folder with nothing to resume."""


def check_run_folder(cfg: Config) -> None:
    """Refuse to start afresh over checkpoints (the earlier run's config.toml would be replaced too) and to
    resume a folder without a config.toml or checkpoint (that would silently train from scratch)."""
    out = Path(cfg.out)
    ckpts = sorted(out.glob("*/checkpoint.pt"))
    if cfg.resume and not ckpts and not (out / "config.toml").is_file():
        raise RunFolderError(
            f"nothing to resume in {out}: no config.toml or checkpoint; drop --resume to start a new run"
        )
    if not cfg.resume and ckpts:
        held = ", ".join(str(p.relative_to(out)) for p in ckpts)
        raise RunFolderError(
            f"run folder {out} holds checkpoints of an earlier run ({held}); use --resume to continue it "
            f"(also to add students to its teacher) or another --out"
        )


def teacher_path(cfg: Config) -> Path:
    return Path(cfg.teacher) if cfg.teacher else Path(cfg.out) / "teacher" / "checkpoint.pt"


def reused_teacher(cfg: Config, data: TrainData, device: torch.device) -> Frozen | None:
    """The teacher this run reuses instead of training it (``--teacher``, or with ``--phases student`` the run
    folder's own), loaded and checked against the data; None when the run trains its teacher."""
    if not cfg.teacher and cfg.phases in ("teacher", "all"):
        return None
    path = teacher_path(cfg)
    if not cfg.teacher and not path.is_file():
        raise CheckpointError(f"--phases student needs a teacher: pass --teacher PATH (none at {path})")
    teacher, head = load_frozen(path, cfg, cfg.arch, device)
    needs_head = [m for m in cfg.methods() if "teacher_logits" in registry.needs_of(m)]
    if head.num_classes != data.num_classes and needs_head:
        raise CheckpointError(
            f"teacher {path} has a {head.num_classes}-class head but the data has {data.num_classes} "
            f"classes; {needs_head[0]} (logit KD) needs the teacher's head for the same classes"
        )
    return teacher, head


def run(cfg: Config) -> dict:
    """The whole pipeline for a resolved config; returns the results dict (also written to the run folder; {}
    in the processes other than rank 0).

    The run folder, device, data and a reused teacher are checked before anything is written: bad input
    leaves no folder behind and changes no earlier run."""
    world = distributed.from_env()
    if cfg.batch_size % world.size:
        raise ConfigError(f"config key 'batch_size': the global batch {cfg.batch_size} does not split over "
                          f"{world.size} processes; use a multiple of {world.size}")
    world, device = distributed.setup(resolve_device(cfg.device))
    malloc = hostmem.keep_freed_memory() if device.type == "cpu" and cfg.keep_freed_memory else None
    if world.restart and not cfg.resume:
        # torchrun restarted the group after a worker died: continue from the checkpoints the first attempt left
        cfg = dataclasses.replace(cfg, resume=True)
    check_run_folder(cfg)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    teacher = reused_teacher(cfg, data, device)
    distributed.barrier()  # every process checked the folder before rank 0 writes into it
    out = Path(cfg.out)
    with runlock.hold(out) if world.main else nullcontext():
        if world.main:
            check_run_folder(cfg)  # again under the lock: a run that held it may have written checkpoints since
            with replacing(out / "config.toml") as tmp:
                tmp.write_text(to_toml(cfg))
            print(f"askd: {cfg.arch}/{cfg.variant} on {device}, {data.describe()}, LR {cfg.low_res_side()} px, "
                  f"out {out}")
            if world.distributed:
                print(f"askd: {world.size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), global batch "
                      f"{cfg.batch_size} = {world.size} x {cfg.batch_size // world.size}"
                      + (", SyncBatchNorm" if cfg.sync_bn else "")
                      + (f"; restart {world.restart}, resuming" if world.restart else ""))
            if cfg.fused:
                print("askd: --fused:", backend.describe_fallback(device))
            if malloc:
                print("askd:", malloc)
        return train_and_evaluate(cfg, data, teacher, device, world)


def train_student(cfg: Config, spec: str, teacher: Frozen, data: TrainData, device: torch.device,
                  world: World) -> tuple:
    """One student of method ``spec`` distilled from ``teacher`` (frozen, its forward as the run runs it),
    through an assistant with ``--assistant``; returns (student, assistant or None), frozen."""
    arch, assistant = cfg.assistant or cfg.arch, None
    method = build(spec, cfg, data.num_classes)
    if cfg.assistant and method.needs:
        # HORKD's cross-structure phase: the assistant learns from the teacher on HR with the same method
        phase = Phase("assistant", method, arch, *teacher)
        assistant = load_frozen(fit(cfg, phase, data, device, world), cfg, arch, device)
        teacher = (teacher_forward(cfg, assistant[0]), assistant[1])
        method = build(spec, cfg, data.num_classes)  # a fresh method state for the cross-resolution phase
    path = fit(cfg, Phase("student", method, arch, *teacher), data, device, world)
    return load_frozen(path, cfg, arch, device)[0], assistant and assistant[0]


def train_and_evaluate(cfg: Config, data: TrainData, teacher: Frozen | None, device: torch.device,
                       world: World = SINGLE) -> dict:
    """Train the teacher (unless ``teacher`` is given) and the students; rank 0 evaluates and writes the results."""
    out = Path(cfg.out)
    if teacher is None:
        phase = Phase("teacher", build("base", cfg, data.num_classes), cfg.arch)
        teacher = load_frozen(fit(cfg, phase, data, device, world), cfg, cfg.arch, device)
    students, assistants = {}, {}
    if cfg.phases in ("student", "all"):
        runs_as = (teacher_forward(cfg, teacher[0]), teacher[1])
        for spec in cfg.methods():
            name = registry.canonical(spec)
            students[name], assistant = train_student(cfg, spec, runs_as, data, device, world)
            if assistant is not None:
                assistants[name] = assistant
    if not world.main:
        return {}
    task = task_of(cfg)
    results = task.evaluate(cfg, data, teacher[0], students, device, assistants)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = task.format_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results
