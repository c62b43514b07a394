"""``python -m askd.train``: HR teacher -> frozen -> LR students (base / kd / askd / askd_kd) -> evaluation.

One run folder (``--out``) holds ``config.toml`` (the resolved config), ``teacher/`` and one
``student_<method>/`` per method, each with ``checkpoint.pt`` and ``metrics.jsonl``, and at the end
``results.json`` and ``results.md``: 10-fold verification accuracy of the teacher on HR and LR and of
every student on LR, and the per-block Pearson correlation of teacher (HR) and student (LR) maps.

A training step (DESIGN.md section 3): uint8 HR batch -> device, [-1,1], random flip -> degrade -> teacher
forward without grad -> student forward -> ArcFace (+ distillation) -> SGD step; the LR schedule is
evaluated per step. Exit status 2 with one line on stderr for bad input, found before anything is written.

A run folder is used by one run at a time (``askd.runlock``). One that holds checkpoints is continued only
with ``--resume``; a new run there is refused, as is ``--resume`` of a folder with nothing to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import backend, models, runlock
from .atomic import replacing
from .checkpoint import CheckpointError, load, rng_state, save_atomic, set_rng_state
from .config import Config, ConfigError, apply, load_toml, parse_set, resolve_config, to_toml
from .data import degrade
from .data.sources import DataError, TrainData, build_data, iterate_batches
from .eval.report import evaluate_run, format_table, verify_sets
from .losses import attention_distill_loss, kd_loss
from .nn import ArcFace

# command-line flags that are shorthands for config keys
FLAGS = {
    "stage": str, "teacher": str, "variant": str, "scale": int, "lr_size": int, "data": str, "arch": str,
    "epochs": int, "batch_size": int, "out": str, "seed": int, "device": str, "amp": str, "method": str,
}
SWITCHES = ("channels_last", "compile", "fused", "resume")


def parse_args(argv: list[str] | None) -> Config:
    """Command line -> resolved Config: defaults < (with --resume: the run folder's config.toml) < --config
    < flags < --set."""
    p = argparse.ArgumentParser(prog="python -m askd.train", description=__doc__.split("\n")[0])
    for name, kind in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"config key {name}")
    for name in SWITCHES:
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=f"set {name}=true")
    p.add_argument("--config", help="TOML file of config keys, or a preset: official_ir50, paper_ir50")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    args = p.parse_args(argv)
    flags = {k: v for k in (*FLAGS, *SWITCHES) if (v := getattr(args, k)) is not None}

    def resolve(base: Config) -> Config:
        cfg = apply(base, load_toml(resolve_config(args.config)), args.config) if args.config else base
        return apply(apply(cfg, flags, "command line"), parse_set(args.set), "--set")

    cfg = resolve(Config())
    saved = Path(cfg.out) / "config.toml"
    if cfg.resume and saved.is_file():
        # a resumed run starts from the config it was started with; what is given now still overrides it
        cfg = resolve(apply(Config(), load_toml(saved), str(saved)))
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device': {name!r} is not a device; expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of the base LR at optimiser step ``step``: 0.1 per milestone passed.

    Milestones are fractions of training. ``official`` reproduces the authors' scheduler, which is stepped
    at the start of every epoch and so lowers the LR one epoch (of their 20) earlier than the paper's
    text: the shift is 1/20 of training, exactly one epoch in the 20-epoch recipe.
    """
    total = cfg.epochs * steps_per_epoch
    shift = total / 20 if cfg.variant == "official" else 0
    passed = sum(step >= round(m * total) - shift for m in cfg.milestones)
    return 0.1**passed


@dataclasses.dataclass
class Stage:
    """What one model's training needs: its role and, for students, the frozen teacher."""

    role: str  # "teacher" or a student method
    teacher: torch.nn.Module | None = None
    teacher_head: ArcFace | None = None

    @property
    def dirname(self) -> str:
        return "teacher" if self.role == "teacher" else f"student_{self.role}"


def to_input(images: torch.Tensor, device: torch.device, flip: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float (B,3,H,W) in [-1,1] on ``device``, images with ``flip[b]`` mirrored."""
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    x = torch.where(flip.to(device)[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def accuracy(head: ArcFace, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of the batch whose nearest class centre (cosine, no margin) is its label: training progress."""
    with torch.no_grad():
        return (head.cosine(emb).argmax(1) == labels).float().mean()


def random_flips(n: int, seed: int, step: int) -> torch.Tensor:
    """Which of the step's n images to mirror, bool (n,): a function of (seed, step) so resumes repeat it."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)) < 0.5


def step_loss(cfg: Config, stage: Stage, model, head: ArcFace, hr: torch.Tensor, labels: torch.Tensor) -> dict:
    """Forward one batch; returns the loss terms (``loss`` is what is minimised)."""
    if stage.role == "teacher":
        emb, _ = model(hr)
        logits = head(emb, labels)
        ce = F.cross_entropy(logits, labels)
        return {"loss": ce, "ce": ce, "acc": accuracy(head, emb, labels)}
    lr = degrade(hr, cfg.lr_side(), cfg.variant)
    with torch.no_grad():
        t_emb, t_maps = stage.teacher(hr)
    emb, s_maps = model(lr)
    logits = head(emb, labels)
    terms = {"ce": F.cross_entropy(logits, labels), "acc": accuracy(head, emb, labels)}
    terms["loss"] = terms["ce"]
    if stage.role in ("askd", "askd_kd"):
        terms["distill"] = attention_distill_loss(t_maps, s_maps, cfg.variant, cfg.distill_weight, fused_backend(cfg))
        terms["loss"] = terms["loss"] + terms["distill"]
    if stage.role in ("kd", "askd_kd"):
        with torch.no_grad():
            t_logits = stage.teacher_head(t_emb, labels)
        terms["kd"] = kd_loss(t_logits, logits, cfg.kd_temperature)
        terms["loss"] = terms["loss"] + terms["kd"]
    return terms


def fused_backend(cfg: Config) -> str | None:
    """--fused: backend auto for every CBAM and the loss; otherwise None ($ASKD_BACKEND, else torch)."""
    return "auto" if cfg.fused else None


def build_model(cfg: Config, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, ArcFace]:
    model = models.create(cfg.arch, cfg.variant, cfg.embedding_size, backend=fused_backend(cfg))
    head = ArcFace(cfg.embedding_size, num_classes, cfg.arcface_s, cfg.arcface_m)
    model, head = model.to(device), head.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, head


@dataclasses.dataclass
class Trainer:
    """One model's training state: model and ArcFace head, SGD, the per-step LR schedule, the AMP scaler."""

    cfg: Config
    stage: Stage
    model: torch.nn.Module
    head: ArcFace
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    num_classes: int
    step: int = 0
    fwd: Callable | None = None  # what the forward runs through: the compiled model, or None for the model itself

    @classmethod
    def create(cls, cfg: Config, stage: Stage, num_classes: int, steps_per_epoch: int, device: torch.device) -> Trainer:
        """A fresh model, head, optimiser and schedule for ``cfg``; the model compiled with ``--compile``."""
        torch.manual_seed(cfg.seed)
        model, head = build_model(cfg, num_classes, device)
        params = [*model.parameters(), *head.parameters()]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch))
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        fwd = compile_model(model) if cfg.compile else None
        return cls(cfg, stage, model, head, opt, sched, scaler, num_classes, fwd=fwd)

    def state(self, epoch: int) -> dict:
        """The checkpoint dict (see askd.checkpoint)."""
        cfg = self.cfg
        return {
            "model": self.model.state_dict(), "head": self.head.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
            "step": self.step, "rng": rng_state(), "config": dataclasses.asdict(cfg), "role": self.stage.role,
            "arch": cfg.arch, "variant": cfg.variant, "embedding_size": cfg.embedding_size,
            "num_classes": self.num_classes,
        }

    def restore(self, ckpt: dict) -> None:
        """Load this model's own checkpoint; one of another role, architecture or variant is refused."""
        cfg, role = self.cfg, self.stage.role
        if ckpt.get("role") != role or ckpt["arch"] != cfg.arch or ckpt["variant"] != cfg.variant:
            raise CheckpointError(
                f"cannot resume {self.stage.dirname}: its checkpoint is {ckpt.get('role')}/{ckpt['arch']}/"
                f"{ckpt['variant']}, this run is {role}/{cfg.arch}/{cfg.variant}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.head.load_state_dict(ckpt["head"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])

    def train_step(self, hr: torch.Tensor, labels: torch.Tensor) -> dict:
        """Forward (under autocast when asked), backward, SGD and schedule step; returns the loss terms.

        hr: float (B,3,112,112) in [-1,1] on the device (see :func:`to_input`); labels: int64 (B,)."""
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)
        with torch.autocast(hr.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            terms = step_loss(self.cfg, self.stage, self.model if self.fwd is None else self.fwd, self.head, hr, labels)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16: the scaler skips steps with inf/nan gradients; the schedule still counts them (torch warns)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.step += 1
        return terms


def compile_model(model: torch.nn.Module):
    """torch.compile ``model`` with inductor's defaults."""
    return torch.compile(model)


def teacher_forward(cfg: Config, teacher: torch.nn.Module):
    """What the students' steps run the frozen teacher through: with ``--compile`` it is compiled too, once for
    every student. Measured with bench/test_train_step.py (B=64 ir_tiny_cbam, 2-core Sapphire Rapids Xeon):
    a --fused --compile step 1.13x faster with bf16 autocast than with the student alone compiled, and as
    fast in float32, for ~10 s more compilation. Evaluation keeps the plain module (other batch sizes)."""
    return compile_model(teacher) if cfg.compile else teacher


def fit(cfg: Config, stage: Stage, data: TrainData, device: torch.device) -> Path:
    """Train one model (resuming from its checkpoint with ``--resume``); returns the checkpoint path."""
    ckpt_path = Path(cfg.out) / stage.dirname / "checkpoint.pt"
    spe = data.steps_per_epoch(cfg.batch_size)
    t = Trainer.create(cfg, stage, data.num_classes, spe, device)
    total = cfg.epochs * spe if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * spe)
    if cfg.resume and ckpt_path.is_file():
        t.restore(load(ckpt_path))
        if t.step >= total:
            print(f"[{stage.dirname}] already trained ({t.step} steps): {ckpt_path}")
            return ckpt_path
        print(f"[{stage.dirname}] resuming at step {t.step} of {total}")
        forget_steps_after(ckpt_path.parent / "metrics.jsonl", t.step)
    elif ckpt_path.exists():  # run() refuses this; a direct caller of fit gets the old checkpoint replaced
        print(f"[{stage.dirname}] starting afresh, replacing {ckpt_path} (use --resume to continue it)")
        ckpt_path.unlink()
    elif cfg.resume:
        print(f"[{stage.dirname}] no checkpoint to resume, training from step 0")
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    t.model.train()
    t.head.train()
    bar = tqdm(total=total, initial=t.step, desc=stage.dirname, unit="step", dynamic_ncols=True, mininterval=1.0)
    with open(ckpt_path.parent / "metrics.jsonl", "a") as log:
        t0, seen = time.perf_counter(), 0
        while t.step < total:
            epoch = t.step // spe
            for images, labels in iterate_batches(data, cfg, epoch, t.step % spe):
                hr = to_input(images, device, random_flips(len(labels), cfg.seed, t.step), cfg.channels_last)
                terms = t.train_step(hr, labels.to(device))
                seen += len(labels)
                bar.update()
                if t.step % cfg.log_every == 0 or t.step == total:
                    # reading the loss syncs the device: only at log steps
                    rate = seen / (time.perf_counter() - t0)
                    row = log_step(log, stage, t.step, epoch, terms, t.sched.get_last_lr()[0], rate)
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"[{stage.dirname}] loss became {row['loss']} at step {t.step}")
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
                if cfg.eval_every > 0 and t.step % cfg.eval_every == 0:
                    t0 += log_eval(log, bar, cfg, stage, t, data, device)  # images/s counts training time only
                if cfg.checkpoint_every > 0 and t.step % cfg.checkpoint_every == 0:
                    save_atomic(t.state(epoch), ckpt_path)
                if t.step >= total:
                    break
            save_atomic(t.state(t.step // spe), ckpt_path)
    bar.close()
    return ckpt_path


def forget_steps_after(log_path: Path, step: int) -> None:
    """Drop the metrics lines of steps after ``step`` (those an interrupted run logged past its last
    checkpoint): the resumed run trains and logs them again, and each step should appear once."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with replacing(log_path) as tmp:
            tmp.write_text("".join(kept))


def log_step(log, stage: Stage, step: int, epoch: int, terms: dict, lr: float, rate: float) -> dict:
    """Append one metrics line (loss terms, training accuracy, LR, images/s); returns it."""
    row = {"stage": stage.dirname, "step": step, "epoch": epoch, "lr": lr, "img_per_s": round(rate, 2)}
    row.update({k: round(v.item(), 6) for k, v in terms.items()})
    log.write(json.dumps(row) + "\n")
    log.flush()
    return row


def log_eval(log, bar, cfg: Config, stage: Stage, t: Trainer, data: TrainData, device: torch.device) -> float:
    """Verify the model in training on every set of ``data`` (HR for the teacher, LR for students) and log it;
    returns the seconds it took.

    The model runs in eval mode and goes back to training mode; no random draw is taken, so a run with
    evaluations follows the same path as one without."""
    start = time.perf_counter()
    side = None if stage.role == "teacher" else cfg.lr_side()
    transform = None if side is None else (lambda x: degrade(x, side, cfg.variant))
    accs = {name: r["accuracy"] for name, r in verify_sets(t.model, data.eval_sets, cfg.eval_protocol, transform,
                                                           device).items()}
    row = {"stage": stage.dirname, "step": t.step, "eval": {k: round(v, 6) for k, v in accs.items()}}
    log.write(json.dumps(row) + "\n")
    log.flush()
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items())
    bar.write(f"[{stage.dirname}] step {t.step}: verification ({'HR' if side is None else f'LR {side} px'}) {shown}")
    return time.perf_counter() - start


def load_frozen(path: Path, cfg: Config, device: torch.device) -> tuple[torch.nn.Module, ArcFace]:
    """Model and head from a checkpoint in eval mode without grad; a mismatch with ``cfg`` ends clearly."""
    ckpt = load(path)
    want = (cfg.arch, cfg.variant, cfg.embedding_size)
    have = (ckpt["arch"], ckpt["variant"], ckpt["embedding_size"])
    if have != want:
        raise CheckpointError(
            f"checkpoint {path} is {have[0]} / variant {have[1]} / embedding {have[2]}, but this run uses "
            f"{want[0]} / variant {want[1]} / embedding {want[2]}; pass matching --arch/--variant or another teacher"
        )
    model, head = build_model(cfg, ckpt["num_classes"], device)
    model.load_state_dict(ckpt["model"])
    head.load_state_dict(ckpt["head"])
    return freeze(model, head)


def freeze(model: torch.nn.Module, head: ArcFace) -> tuple[torch.nn.Module, ArcFace]:
    """``model`` and ``head`` in eval mode without gradients: a teacher, or a trained model to evaluate."""
    for module in (model, head):
        module.eval().requires_grad_(False)
    return model, head


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


def reused_teacher(cfg: Config, data: TrainData, device: torch.device) -> tuple[torch.nn.Module, ArcFace] | None:
    """The teacher this run reuses instead of training it (``--teacher``, or with ``--stage student`` the run
    folder's own), loaded and checked against the data; None when the run trains its teacher."""
    if not cfg.teacher and cfg.stage in ("teacher", "all"):
        return None
    path = teacher_path(cfg)
    if not cfg.teacher and not path.is_file():
        raise CheckpointError(f"--stage student needs a teacher: pass --teacher PATH (none at {path})")
    teacher, head = load_frozen(path, cfg, device)
    if head.num_classes != data.num_classes and any(m in ("kd", "askd_kd") for m in cfg.methods()):
        raise CheckpointError(
            f"teacher {path} has a {head.num_classes}-class head but the data has {data.num_classes} "
            f"identities; logit KD needs the teacher's head for the same identities"
        )
    return teacher, head


def run(cfg: Config) -> dict:
    """The whole pipeline for a resolved config; returns the results dict (also written to the run folder).

    The run folder, device, data and a reused teacher are checked before anything is written: bad input
    leaves no folder behind and changes no earlier run."""
    check_run_folder(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    teacher = reused_teacher(cfg, data, device)
    out = Path(cfg.out)
    with runlock.hold(out):
        check_run_folder(cfg)  # again under the lock: a run that held it may have written checkpoints since
        with replacing(out / "config.toml") as tmp:
            tmp.write_text(to_toml(cfg))
        print(f"askd: {cfg.arch}/{cfg.variant} on {device}, {data.describe()}, LR {cfg.lr_side()} px, out {out}")
        if cfg.fused:
            print("askd: --fused:", backend.describe_fallback(device))
        return train_and_evaluate(cfg, data, teacher, device)


def train_and_evaluate(cfg: Config, data: TrainData, teacher: tuple | None, device: torch.device) -> dict:
    """Train the teacher (unless ``teacher`` is given) and the students, evaluate, write the results."""
    out = Path(cfg.out)
    if teacher is None:
        teacher = load_frozen(fit(cfg, Stage("teacher"), data, device), cfg, device)
    teacher, teacher_head = teacher
    students = {}
    if cfg.stage in ("student", "all"):
        teacher_fwd = teacher_forward(cfg, teacher)
        for method in cfg.methods():
            path = fit(cfg, Stage(method, teacher_fwd, teacher_head), data, device)
            students[method] = load_frozen(path, cfg, device)[0]
    results = evaluate_run(cfg, data, teacher, students, device)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (ConfigError, CheckpointError, DataError, RunFolderError, runlock.RunLockError) as e:
        print(f"askd.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("askd.train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
