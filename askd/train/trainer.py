"""One model's training: its phase (:class:`Phase`), its state (:class:`Trainer`) and one step.

A training step (DESIGN.md section 3): uint8 HR batch -> device, [-1,1], random flip (:func:`to_input`) ->
the LR version for a student -> frozen teacher forward on HR without grad (only when the method uses it) ->
forward -> cross-entropy of the head's logits (ArcFace's for faces, the classifier's for ``--task classify``: see
:mod:`askd.train.tasks`) + the method's loss terms -> SGD step; the learning-rate schedule is evaluated per
step. The step knows no method names: a method (:mod:`askd.losses`) says what it needs and returns its terms.
A step whose loss or gradients are not finite changes no weight (fp16: the loss scaler skips gradient
overflows on its own).

Under torchrun the backbone and head train in DistributedDataParallel, each process on its share of the global
batch (the frozen teacher stays outside: no gradients, no buckets); ``sync_bn`` converts the BatchNorms to
SyncBatchNorm, and the head's dropout draws the global batch's mask (askd.nn.dropout), so that N processes
reproduce one up to floating-point reduction order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import CheckpointError, rng_state, set_rng_state
from ..config import Config
from ..distributed import SINGLE, World, any_true
from ..losses import Method, Outputs
from ..nn.dropout import set_batch_share
from ..nn.syncbn import convert_sync_batchnorm
from .tasks import task_of

ROLES = ("teacher", "assistant", "student")  # what a phase trains: the inputs are HR, HR and LR


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step``: 0.1 per milestone passed.

    Milestones are fractions of training. ``official`` reproduces the authors' face scheduler, which is stepped
    at the start of every epoch and so lowers the learning rate one epoch (of their 20) earlier than the paper's
    text: the shift is 1/20 of training, exactly one epoch in the 20-epoch recipe (not for ``--task classify``).
    """
    total = cfg.epochs * steps_per_epoch
    shift = total / 20 if cfg.variant == "official" and cfg.task == "face" else 0
    passed = sum(step >= round(m * total) - shift for m in cfg.milestones)
    return 0.1**passed


@dataclasses.dataclass
class Phase:
    """One phase of a run: a ``role`` model of architecture ``arch`` trained with ``method`` (the teacher's is
    ``base``), against the frozen ``teacher`` (its forward: the module or its compiled version) and its
    head when the method needs them. Students see the LR images, the teacher and HORKD's assistant HR."""

    role: str
    method: Method
    arch: str
    teacher: Callable | None = None
    teacher_head: nn.Module | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"phase role {self.role!r}: expected one of {ROLES}")
        if self.method.needs and self.teacher is None:
            raise ValueError(f"method {self.method.name} needs {sorted(self.method.needs)} of a teacher; none given")

    @property
    def dirname(self) -> str:
        """Its folder in the run folder: ``teacher``, ``assistant_<method>``, ``student_<method>``."""
        return "teacher" if self.role == "teacher" else f"{self.role}_{self.method.name}"

    @property
    def low_res_input(self) -> bool:
        """Whether this phase's model sees the LR images (a student) rather than HR."""
        return self.role == "student"


def to_input(images: torch.Tensor, device: torch.device, flip: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float (B,3,H,W) in [-1,1] on ``device``, images with ``flip[b]`` mirrored."""
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    x = torch.where(flip.to(device)[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def accuracy(head: nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of the batch whose best class without a margin (``head.predict``: ArcFace's cosine, a classifier's
    logits) is its label: training progress."""
    with torch.no_grad():
        return (head.predict(emb).argmax(1) == labels).float().mean()


def random_flips(n: int, seed: int, step: int) -> torch.Tensor:
    """Which of the step's n images to mirror, bool (n,): a function of (seed, step) so resumes repeat it."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)) < 0.5


def step_loss(cfg: Config, phase: Phase, model, head: nn.Module, hr: torch.Tensor, labels: torch.Tensor) -> dict:
    """Forward one batch; returns the loss terms: ``ce`` and the method's, their sum ``loss`` (what is
    minimised) and the training accuracy ``acc``. The task (:mod:`askd.train.tasks`) makes the LR images and
    the embeddings; the head makes the logits (ArcFace's margin logits, or a classifier's)."""
    needs, task = phase.method.needs, task_of(cfg)
    x = task.low_res(cfg, hr) if phase.low_res_input else hr
    emb, maps, feats = task.embed(model, x, "stages" in needs)
    logits = head(emb, labels)
    out = Outputs(labels, emb, maps, logits, student_stages=feats)
    if needs:
        with torch.no_grad():
            out.teacher_emb, out.teacher_maps, out.teacher_stages = task.embed(phase.teacher, hr, "stages" in needs)
            if "teacher_logits" in needs:
                out.teacher_logits = phase.teacher_head(out.teacher_emb, labels)
    terms = {"ce": F.cross_entropy(logits, labels), **phase.method(out)}
    return {"loss": sum(terms.values()), **terms, "acc": accuracy(head, emb, labels)}


def build_model(cfg: Config, arch: str, num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A fresh model of ``arch`` (the config's variant, embedding size and kernels) and its head (the task's)."""
    model, head = task_of(cfg).build(cfg, arch, num_classes, device, backend=cfg.kernel_backend())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, head


class StepModule(nn.Module):
    """What one step trains, as one module (what DistributedDataParallel wraps): the model and its head
    (ArcFace; a classifier's is part of the model); ``forward(hr, labels)`` is :func:`step_loss`. Methods hold no
    parameters (HORKD's centres are buffers the method keeps equal across processes itself): they stay outside."""

    def __init__(self, cfg: Config, phase: Phase, model: nn.Module, head: nn.Module, fwd: Callable | None):
        super().__init__()
        self.model, self.head = model, head
        # not submodules: the phase holds the frozen teacher, and a compiled model shares the model's parameters
        self.__dict__.update(cfg=cfg, phase=phase, fwd=fwd)

    def forward(self, hr: torch.Tensor, labels: torch.Tensor) -> dict:
        return step_loss(self.cfg, self.phase, self.model if self.fwd is None else self.fwd, self.head, hr, labels)


# DistributedDataParallel settings (bench/ddp.py; bench/results/ddp-cpu-epyc-2core.md): on 2 CPU processes neither
# changed the step beyond the launch-to-launch spread; set because a phase's graph never changes, and gradients
# written straight into the buckets save one gradient-sized copy
DDP_STATIC_GRAPH = True
DDP_GRADIENT_AS_BUCKET_VIEW = True


def distribute(cfg: Config, module: StepModule, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (the process group is up): gradients all-reduced in buckets of
    ``ddp_bucket_mb``; BatchNorm buffers broadcast from rank 0 unless ``sync_bn`` keeps them equal anyway."""
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cfg.ddp_bucket_mb,
        forward_sync_buffers=not cfg.sync_bn, gradient_as_bucket_view=DDP_GRADIENT_AS_BUCKET_VIEW,
        static_graph=DDP_STATIC_GRAPH,
    )


def compile_model(model: torch.nn.Module):
    """torch.compile ``model`` with inductor's defaults."""
    return torch.compile(model)


def freeze(model: torch.nn.Module, head: nn.Module) -> tuple[torch.nn.Module, nn.Module]:
    """``model`` and ``head`` in eval mode without gradients: a teacher, or a trained model to evaluate."""
    for module in (model, head):
        module.eval().requires_grad_(False)
    return model, head


@dataclasses.dataclass
class Trainer:
    """One model's training state: model and head, the method (and its state), SGD, the per-step
    learning-rate schedule, the AMP scaler; ``step_fn`` runs a step's forward (a :class:`StepModule`, in
    DistributedDataParallel under torchrun) and ``world`` says which process this is."""

    cfg: Config
    phase: Phase
    model: torch.nn.Module
    head: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    num_classes: int
    step_fn: Callable | None = None  # None: the model and head as they are, in one process
    world: World = SINGLE
    step: int = 0

    def __post_init__(self):
        if self.step_fn is None:
            self.step_fn = StepModule(self.cfg, self.phase, self.model, self.head, None)

    @classmethod
    def create(cls, cfg: Config, phase: Phase, num_classes: int, steps_per_epoch: int, device: torch.device,
               world: World = SINGLE) -> Trainer:
        """A fresh model, head, optimiser and schedule for ``cfg``; the model compiled with ``--compile``; in
        DistributedDataParallel when ``world`` has more than one process."""
        torch.manual_seed(cfg.seed)
        model, head = build_model(cfg, phase.arch, num_classes, device)
        if world.distributed:
            set_batch_share(model, world.rank, world.size)
            if cfg.sync_bn:
                model = convert_sync_batchnorm(model, device)
        phase.method.to(device)
        params = [*model.parameters(), *head.parameters(), *phase.method.parameters()]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch))
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        step_fn = StepModule(cfg, phase, model, head, compile_model(model) if cfg.compile else None)
        if world.distributed:
            step_fn = distribute(cfg, step_fn, device)
        return cls(cfg, phase, model, head, opt, sched, scaler, num_classes, step_fn, world)

    def state(self, epoch: int) -> dict:
        """The checkpoint dict (see askd.checkpoint)."""
        cfg, phase = self.cfg, self.phase
        return {
            "model": self.model.state_dict(), "head": self.head.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
            "step": self.step, "rng": rng_state(), "config": dataclasses.asdict(cfg), "role": phase.role,
            "method": phase.method.name, "method_state": phase.method.state_dict(), "arch": phase.arch,
            "variant": cfg.variant, "embedding_size": cfg.embedding_size, "num_classes": self.num_classes,
            "task": cfg.task, "model_kwargs": task_of(cfg).model_kwargs(cfg, self.num_classes),
        }

    def restore(self, ckpt: dict) -> None:
        """Load this model's own checkpoint; one of another phase, architecture or variant is refused."""
        phase, variant = self.phase, self.cfg.variant
        have = (ckpt.get("role"), ckpt.get("method"), ckpt["arch"], ckpt["variant"])
        want = (phase.role, phase.method.name, phase.arch, variant)
        if have != want:
            raise CheckpointError(
                f"cannot resume {phase.dirname}: its checkpoint is {'/'.join(map(str, have))} "
                f"(role/method/arch/variant), this run is {'/'.join(want)}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.head.load_state_dict(ckpt["head"])
        self.phase.method.load_state_dict(ckpt["method_state"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])

    def train_step(self, hr: torch.Tensor, labels: torch.Tensor) -> tuple[dict, bool]:
        """Forward (under autocast when asked), backward, SGD and schedule step; returns the loss terms and
        whether the weights were updated: not when the loss or the gradients were not finite in any process.

        hr: float (b,3,112,112) in [-1,1] on the device (see :func:`to_input`); labels: int64 (b,); b is this
        process's share of the global batch."""
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)
        with torch.autocast(hr.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            terms = self.step_fn(hr, labels)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.opt)
        finite = self.finite(terms["loss"])
        if finite:
            self.scaler.step(self.opt)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16: the scaler skips steps with inf/nan gradients; the schedule still counts them (torch warns)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.step += 1
        return terms, finite

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether this step's loss and gradients are finite in every process (the gradients, all-reduced, are
        the same in each; the loss is each one's own). With fp16 the scaler checks the gradients itself."""
        ok = torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():
            grads = [p.grad for group in self.opt.param_groups for p in group["params"] if p.grad is not None]
            ok &= torch.isfinite(torch.nn.utils.get_total_norm(grads))
        return not any_true(not bool(ok), loss.device)
