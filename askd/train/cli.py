"""The command line of ``python -m askd.train``: flags and files -> one resolved Config -> the pipeline.

Precedence: defaults < (with --resume: the run folder's config.toml) < --config < flags < --set. Exit status
2 with one line on stderr for bad input, found before anything is written; 3 when the loss stayed non-finite
(``max_bad_steps``); 130 when interrupted. Under ``torchrun`` the same command runs in every process.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .. import distributed, runlock
from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, apply, load_toml, parse_set, resolve_config
from ..data.sources import DataError
from ..losses import registry
from .fit import TrainingDiverged
from .pipeline import RunFolderError, run

# command-line flags that are shorthands for config keys
FLAGS = {
    "task": str, "phases": str, "teacher": str, "variant": str, "scale": int, "low_res_size": int, "data": str,
    "arch": str, "epochs": int, "batch_size": int, "out": str, "seed": int, "device": str, "amp": str,
    "method": str, "assistant": str,
}
# the flags of keys since renamed (askd.config.RENAMED_KEYS) stay as plain synonyms: scripts and docs use them
OLD_FLAGS = {"phases": ("--stage",), "low_res_size": ("--lr-size",)}
SWITCHES = ("channels_last", "compile", "fused", "resume")
# the errors of bad input: one line on stderr and exit status 2 (askd.experiment ends the same way)
ERRORS = (ConfigError, CheckpointError, DataError, RunFolderError, runlock.RunLockError)
DESCRIPTION = ("HR teacher -> frozen -> one LR student per method -> evaluation (A-SKD and the paper's baselines); "
               "faces (--task face, the default) or image classification (--task classify).")


def methods_help() -> str:
    """The --method choices, from the registry: one line each with its source."""
    lines = [f"  {name:8s} {cls.paper}" for name, cls in registry.REGISTRY.items()]
    aliases = ", ".join(f"{a} = {spec}" for a, spec in registry.ALIASES.items())
    return "methods (--method, join with + to add their losses; aliases: " + aliases + "):\n" + "\n".join(lines)


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add the flags of config keys (:data:`FLAGS`, :data:`SWITCHES`), ``--config`` and ``--set`` to ``p``, less
    the keys in ``skip`` (a caller that sets those keys itself, as ``askd.experiment`` does ``scale``)."""
    for name, kind in FLAGS.items():
        if name not in skip:
            spellings = ("--" + name.replace("_", "-"), *OLD_FLAGS.get(name, ()))
            p.add_argument(*spellings, type=kind, default=None, help=f"config key {name}")
    for name in SWITCHES:
        if name not in skip:
            p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=f"set {name}=true")
    p.add_argument("--config", help="TOML file of config keys, or a preset: official_ir50, paper_ir50")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")


def config_from(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Parsed flags of :func:`add_config_flags` -> resolved Config over ``base`` (default ``Config()``); see the
    module docstring for the precedence."""
    flags = {k: v for k in (*FLAGS, *SWITCHES) if (v := getattr(args, k, None)) is not None}

    def resolve(base: Config) -> Config:
        cfg = apply(base, load_toml(resolve_config(args.config)), args.config) if args.config else base
        return apply(apply(cfg, flags, "command line"), parse_set(args.set), "--set")

    cfg = resolve(base or Config())
    saved = Path(cfg.out) / "config.toml"
    if cfg.resume and saved.is_file():
        # a resumed run starts from the config it was started with; what is given now still overrides it
        cfg = resolve(apply(Config(), load_toml(saved), str(saved)))
    return cfg


def parse_args(argv: list[str] | None) -> Config:
    """Command line -> resolved Config (see the module docstring for the precedence)."""
    p = argparse.ArgumentParser(prog="python -m askd.train", description=DESCRIPTION, epilog=methods_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    return config_from(p.parse_args(argv))


def run_cli(prog: str, parse: Callable, execute: Callable, resume_hint: str, argv: list[str] | None) -> int:
    """``execute(parse(argv))`` with the exit statuses of askd's commands: 2 and one line on stderr for bad input
    (:data:`ERRORS`), 3 when training diverged (:class:`TrainingDiverged`), 130 when interrupted (with
    ``resume_hint``), else 0. The process group of a torchrun launch ends with the command."""
    try:
        with warnings.catch_warnings():
            # Python hides a DeprecationWarning not raised in __main__; the user of an old config key should see it
            warnings.filterwarnings("default", category=DeprecationWarning, module=r"askd\.")
            parsed = parse(argv)
        execute(parsed)
    except ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {resume_hint}", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("askd.train", parse_args, run, "continue with --resume", argv)


