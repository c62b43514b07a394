"""The one training configuration: a flat dataclass with commented defaults, TOML files and overrides.

Precedence: defaults < ``--config FILE.toml`` < command-line flags < ``--set key=value``. Setting ``task`` moves
the task-dependent keys (:data:`TASK_DEFAULTS`: arch, method, scale) that are still at the other task's defaults.
Unknown keys and values of the wrong type are errors; the old names of renamed keys (:data:`RENAMED_KEYS`) still work,
with a DeprecationWarning. The defaults are the CPU demo (tiny model, embedded synthetic
faces, minutes on a laptop); ``configs/official_ir50.toml`` holds the paper's full recipe. ``--config`` also
takes a preset name (``official_ir50``, ``paper_ir50``): a file of ``configs/``, shipped in the package as
``askd/configs/``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import warnings
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .archs import ARCHS, RESNETS, VARIANTS, names, task_of


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message says which key and why."""


@dataclass
class Config:
    # --- task and model ---
    # face: face verification, IR-ResNets with ArcFace; classify: LR image classification with ResNet-CBAM and
    # softmax, top-1/top-5 (the A-SKD paper's section 5.1; README "Beyond faces")
    task: str = "face"
    # face: ir18_cbam | ir34_cbam | ir50_cbam | ir100_cbam | ir_tiny_cbam; classify: resnet18_cbam | resnet34_cbam
    # | resnet50_cbam | resnet101_cbam | resnet_tiny_cbam. With task classify, arch, method and scale default to
    # TASK_DEFAULTS["classify"] (resnet_tiny_cbam; base,askd+kd,at+kd,rkd+kd; 4)
    arch: str = "ir_tiny_cbam"
    variant: str = "official"  # official (authors' code) | paper (text of the paper); see DESIGN.md section 2
    embedding_size: int = 512  # face: the embedding (classify: the ResNet's own feature width)
    # --- data ---
    data: str = "synthetic"  # "synthetic", an image folder root/<identity>/<image>, or a RecordIO pack folder
    synthetic_identities: int = 100  # training identities of the synthetic set
    synthetic_samples: int = 24  # images per synthetic identity
    eval_identities: int = 50  # held-out synthetic identities for verification
    eval_samples: int = 8  # images per held-out synthetic identity
    eval_fraction: float = 0.2  # image folders: share of identities held out for verification
    val_fraction: float = 0.0  # image folders: share of the training identities held out as "val" pairs (0: none)
    eval_pairs: int = 1200  # verification pairs (half genuine), split into 10 folds
    eval_protocol: str = "insightface"  # insightface | askd
    eval_bins: str = ""  # comma list of verification .bin files to evaluate on (default: a pack's own *.bin)
    eval_every: int = 0  # also verify the model in training every N steps when > 0 (metrics.jsonl "eval")
    scale: int = 8  # LR down-sampling factor: 2 | 4 | 8 (112 -> 56 | 28 | 14 px)
    low_res_size: int = 0  # LR side in px; overrides scale when > 0
    workers: int = 0  # DataLoader worker processes (image folders)
    # classify: the image side in px the models see; 0: the data's own (32 for CIFAR and the shapes set, 224 for
    # an ImageNet-style folder tree). face: always 112
    input_size: int = 0
    shapes_classes: int = 20  # classify on "synthetic": classes of the procedural shapes set
    shapes_samples: int = 250  # classify on "synthetic": training images per class
    shapes_val_samples: int = 50  # classify on "synthetic": validation images per class
    # --- method ---
    phases: str = "all"  # which phases run: teacher | student | all
    # comma list of students, one per method: a name of askd.losses (python -m askd.train --help lists them),
    # or names joined by "+" whose loss terms add up (askd+kd; alias askd_kd)
    method: str = "base,askd"
    teacher: str = ""  # teacher checkpoint to reuse (skips teacher training)
    # HORKD's two-step transfer: teacher (HR) -> assistant of this arch (HR, the same method) -> student (LR,
    # the assistant's arch); "" trains every student directly against the teacher in the teacher's arch
    assistant: str = ""
    arcface_s: float = 32.0
    arcface_m: float = 0.5
    # --- method weights (askd.losses; each module's docstring has the formula and the source) ---
    distill_weight: float = 5.0  # askd, askd_sa, askd_ca: lambda_distill of the A-SKD loss
    kd_weight: float = 1.0  # kd: weight of the logit KD term
    kd_temperature: float = 4.0  # kd: T
    at_beta: float = 1000.0  # at: beta of attention transfer; the term is beta/2 * sum over stages
    at_cos_weight: float = 5.0  # at_cos (AT*): weight of the cosine AT term, A-SKD's
    fkd_weight: float = 0.1  # fkd: lambda of F-KD (the default of Massoli et al.'s code)
    rkd_distance_weight: float = 1.0  # rkd: distance term
    rkd_angle_weight: float = 2.0  # rkd: angle term
    horkd_alpha: float = 0.1  # horkd: pair (distance) term, the A-SKD supplement's value
    horkd_beta: float = 0.2  # horkd: triplet (angle) term
    horkd_gamma: float = 0.1  # horkd: class-centre term
    # --- optimisation (SGD, Nesterov, as the authors) ---
    epochs: int = 5  # epochs per model (teacher and each student); the paper trains 20
    max_steps: int = 0  # stop each model after this many steps when > 0 (smoke tests)
    batch_size: int = 64  # the paper uses 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # lr /10 at these fractions of training. The short CPU demo keeps lr 0.1 longer; the paper's epochs
    # 6, 11, 15, 17 of 20 are [0.3, 0.55, 0.75, 0.85] (configs/official_ir50.toml)
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.75, 0.85, 0.95])
    # --- runtime ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False  # torch.compile the models
    # run the frozen teacher (and assistant) of the students with the BatchNorms after its convolutions and its
    # embedding's Linear folded into them (askd.nn.fold): the same outputs up to float rounding, less work per step;
    # false runs the module as loaded. Checkpoints and evaluation always hold and use the unfolded model
    fold_teacher: bool = True
    fused: bool = False  # fused kernels (backend "auto") for CBAM and the loss where available
    # on a CPU device, have glibc's malloc keep the memory a step frees for the next step instead of handing it
    # back to the kernel (askd.hostmem: fewer page faults, a faster step; the process keeps its peak heap)
    keep_freed_memory: bool = True
    seed: int = 0
    out: str = "runs/askd"  # run folder
    log_every: int = 10  # steps between metrics-log lines
    checkpoint_every: int = 0  # steps between checkpoints when > 0 (always at each epoch end)
    keep_checkpoints: int = 1  # checkpoints kept per model: the newest; K > 1 keeps the last K (checkpoint-<step>.pt)
    resume: bool = False  # continue from the run folder's newest checkpoints that load
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss (each one is skipped)
    # --- many processes (under torchrun; README "Many GPUs, many nodes"); batch_size stays the global batch ---
    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm), not each process's share
    ddp_bucket_mb: float = 25.0  # DistributedDataParallel's gradient bucket size in MiB

    def input_side(self) -> int:
        """The side in px of the (HR) images the models see: 112 for faces; for classification ``input_size``,
        or the data's own (:func:`classify_input_side`)."""
        if self.task == "face":
            return FACE_SIDE
        return self.input_size if self.input_size > 0 else classify_input_side(self.data)

    def low_res_side(self) -> int:
        """The LR (low-resolution) image side in px."""
        return self.low_res_size if self.low_res_size > 0 else self.input_side() // self.scale

    def methods(self) -> list[str]:
        """The students' method specs as given (see :func:`askd.losses.registry.canonical`)."""
        return [m.strip() for m in self.method.split(",") if m.strip()]

    def kernel_backend(self) -> str | None:
        """--fused: backend ``auto`` for every CBAM and the loss; otherwise None ($ASKD_BACKEND, else torch)."""
        return "auto" if self.fused else None

    def __getattr__(self, name: str) -> Any:
        """The old names of renamed keys and of :meth:`low_res_side`, with a DeprecationWarning."""
        if name not in RENAMED_ATTRS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        new = RENAMED_ATTRS[name]
        warnings.warn(f"Config.{name} is deprecated; use Config.{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)


# keys renamed so that "stage" names only an IR-ResNet stage and "lr" only the learning rate: old key -> new key.
# Files and --set may still give the old key (with a DeprecationWarning); run folders of older versions hold them.
RENAMED_KEYS = {"stage": "phases", "lr_size": "low_res_size"}
RENAMED_ATTRS = {**RENAMED_KEYS, "lr_side": "low_res_side"}

FACE_SIDE = 112  # the aligned faces of every face model and data source
# the keys whose defaults depend on the task; a change of task moves those still at the old task's defaults
TASK_DEFAULTS = {
    "face": {"arch": "ir_tiny_cbam", "method": "base,askd", "scale": 8},
    # the paper's Table 4: 4x, every distilled student with logit KD; a small ResNet for the CPU demo
    "classify": {"arch": "resnet_tiny_cbam", "method": "base,askd+kd,at+kd,rkd+kd", "scale": 4},
}
# the datasets of --task classify whose images are 32 px: the shapes set and CIFAR (askd.data.cifar.is_cifar)
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")


def classify_input_side(data: str) -> int:
    """The image side a classification data source comes at: 32 for the shapes set ("synthetic") and CIFAR, 224
    for an ImageNet-style folder tree. A path check only (this module imports no torch)."""
    path = Path(data)
    if data == "synthetic" or path.name in CIFAR_FOLDERS or any((path / name).is_dir() for name in CIFAR_FOLDERS):
        return 32
    return 224


# the method weights (distill_weight, at_beta, horkd_alpha, ...): each >= 0
WEIGHT_SUFFIXES = ("_weight", "_beta", "_alpha", "_gamma")

CHOICES = {
    "task": ("face", "classify"),
    "arch": tuple(names()),
    "variant": tuple(VARIANTS),
    "eval_protocol": ("insightface", "askd"),
    "phases": ("teacher", "student", "all"),
    "amp": ("bf16", "fp16", "off"),
    "scale": (2, 4, 8),
}


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (TOML value or command-line string) to the type of the field's default."""
    kind = type(default)
    try:
        if isinstance(value, str) and kind is not str:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if kind is list:
                return [float(v) for v in value.strip("[]").split(",") if v.strip()]
            return kind(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is list and isinstance(value, list):
            return [float(v) for v in value]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError
        return value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key {key!r}: expected {kind.__name__}, got {value!r}") from None


def renamed(updates: dict[str, Any], source: str) -> dict[str, Any]:
    """``updates`` with old key names (:data:`RENAMED_KEYS`) replaced by the new ones, each with a
    DeprecationWarning naming ``source``; a key given under both names raises ConfigError."""
    out = dict(updates)
    for old, new in RENAMED_KEYS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source}: config key {old!r} is the old name of {new!r}; give only {new!r}")
        warnings.warn(f"{source}: config key {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def apply(cfg: Config, updates: dict[str, Any], source: str) -> Config:
    """Return ``cfg`` with ``updates`` applied; unknown keys raise ConfigError naming ``source``."""
    fields = _fields()
    changes = {}
    for key, value in renamed(updates, source).items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(fields))}")
        changes[key] = _coerce(key, value, getattr(cfg, key))
    task = changes.get("task", cfg.task)
    if task != cfg.task and task in TASK_DEFAULTS:
        # --task classify alone gives a classification run: its defaults replace the face ones not set yet
        changes.update({k: v for k, v in TASK_DEFAULTS[task].items()
                        if k not in changes and getattr(cfg, k) == TASK_DEFAULTS[cfg.task][k]})
    return validate(dataclasses.replace(cfg, **changes))


def parse_set(items: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; a malformed item raises ConfigError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def presets() -> dict[str, Traversable]:
    """Preset name -> its TOML file among the package data (``askd/configs/*.toml``)."""
    folder = resources.files("askd") / "configs"
    if not folder.is_dir():  # a checkout whose askd/configs symlink was not made (git on Windows)
        return {}
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")}


def resolve_config(name: str) -> Path | Traversable:
    """The file ``--config name`` means: an existing path, else the preset of that name (``official_ir50``).

    A path goes first, so a file of the working directory is never shadowed by a preset. A bare name that
    is neither raises ConfigError listing the presets; other paths go on to :func:`load_toml`'s error."""
    path = Path(name)
    if path.is_file() or path.name != name or path.suffix:
        return path
    known = presets()
    if name not in known:
        listed = ", ".join(sorted(known)) or "none found"
        raise ConfigError(f"--config {name!r}: no such file and no such preset; presets: {listed}")
    return known[name]


def load_toml(path: str | Path | Traversable) -> dict[str, Any]:
    """Read a flat TOML config file; a missing or malformed file raises ConfigError."""
    path = Path(path) if isinstance(path, str) else path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {path}: tables are not supported, got [{nested[0]}]; use flat keys")
    return data


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raise ConfigError with the key, the value and what is allowed."""
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: got {value!r}, expected one of {list(allowed)}")
    if cfg.assistant and cfg.assistant not in names():
        raise ConfigError(f"config key 'assistant': got {cfg.assistant!r}, expected '' or one of {names()}")
    for key in ("arch", "assistant"):
        arch = getattr(cfg, key)
        if arch and task_of(arch) != cfg.task:
            same = [name for name in names() if task_of(name) == cfg.task]
            raise ConfigError(f"config key {key!r}: {arch} is a model for task {task_of(arch)}, this run's task is "
                              f"{cfg.task}; expected one of {same}")
    check_methods(cfg)
    if not 2 < cfg.low_res_side() <= cfg.input_side():
        raise ConfigError(f"config key 'low_res_size': got {cfg.low_res_size}, expected 3..{cfg.input_side()} px "
                          f"(or 0 to use scale)")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {f.name!r}: got {value}, expected a finite number")
    positive = ("epochs", "batch_size", "embedding_size", "synthetic_identities", "synthetic_samples", "eval_pairs",
                "keep_checkpoints", "max_bad_steps", "log_every", "shapes_classes", "shapes_samples",
                "shapes_val_samples")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r}: got {getattr(cfg, key)}, expected >= 1")
    for key in ("lr", "kd_temperature", "arcface_s", "ddp_bucket_mb"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"config key {key!r}: got {getattr(cfg, key)}, expected > 0")
    non_negative = ("workers", "weight_decay", "arcface_m", "checkpoint_every", "eval_every", "input_size",
                    *(f.name for f in dataclasses.fields(cfg) if f.name.endswith(WEIGHT_SUFFIXES)))
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r}: got {getattr(cfg, key)}, expected >= 0")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"config key 'momentum': got {cfg.momentum}, expected in [0, 1)")
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ConfigError(f"config key 'eval_fraction': got {cfg.eval_fraction}, expected in (0, 1)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"config key 'val_fraction': got {cfg.val_fraction}, expected in [0, 1)")
    if any(not 0.0 < m < 1.0 for m in cfg.milestones):
        raise ConfigError(f"config key 'milestones': got {cfg.milestones}, expected fractions in (0, 1)")
    return cfg


def check_methods(cfg: Config) -> None:
    """Every spec of ``method`` known to the method registry, no student twice (aliases resolved)."""
    # imported here, not at the top: the registry imports torch, and reading a config file does not need it
    from .losses.registry import canonical, needs_of

    try:
        specs = [canonical(m) for m in cfg.methods()]
    except ValueError as e:
        raise ConfigError(f"config key 'method': {e}") from None
    if not specs:
        raise ConfigError("config key 'method': empty; expected a comma list of methods, e.g. base,askd")
    twice = sorted({m for m in specs if specs.count(m) > 1})
    if twice:
        raise ConfigError(f"config key 'method': {cfg.method!r} names the student {twice[0]} twice")
    if cfg.task == "classify":
        sized = [m for m in specs if "horkd" in m.split("+")]
        if sized:
            raise ConfigError(f"config key 'method': {sized[0]} is for task face only (its class centres have the "
                              f"face embedding's size); with task classify use base, kd, at, at_cos, fkd, rkd, askd...")
    depth = {**{name: sum(blocks) for name, (blocks, _, _) in ARCHS.items()},
             **{name: sum(blocks) for name, (_, blocks, _, _) in RESNETS.items()}}
    if cfg.assistant in depth and depth[cfg.assistant] != depth[cfg.arch]:
        by_maps = [m for m in specs if "maps" in needs_of(m)]
        if by_maps:
            raise ConfigError(
                f"--assistant {cfg.assistant} has {depth[cfg.assistant]} CBAM blocks, the teacher {cfg.arch} "
                f"{depth[cfg.arch]}: {by_maps[0]} compares maps block by block; use an assistant of the same depth"
            )


def to_toml(cfg: Config) -> str:
    """The resolved config as a flat TOML document (loadable again with ``--config``)."""
    lines = ["# askd resolved config"]
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
