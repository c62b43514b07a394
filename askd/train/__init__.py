"""``python -m askd.train``: HR teacher -> frozen -> LR students (one per method) -> evaluation.

- :mod:`askd.train.cli`: the command line -> one resolved Config;
- :mod:`askd.train.pipeline`: the run folder, teacher -> [assistant] -> students -> evaluation;
- :mod:`askd.train.fit`: one model trained to its end (loop, log, checkpoints, resume);
- :mod:`askd.train.trainer`: one model's phase, state and training step.
"""

import warnings

from .cli import main, parse_args
from .fit import fit
from .pipeline import load_frozen, run, teacher_forward
from .trainer import Phase, Trainer, build_model, freeze, lr_factor, random_flips, step_loss, to_input

__all__ = [
    "Phase", "Trainer", "build_model", "fit", "freeze", "load_frozen", "lr_factor", "main", "parse_args",
    "random_flips", "run", "step_loss", "teacher_forward", "to_input",
]


def __getattr__(name: str):
    """``Stage``, the old name of :class:`Phase` (renamed so that "stage" means only an IR-ResNet stage)."""
    if name != "Stage":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("askd.train.Stage is deprecated; use askd.train.Phase", DeprecationWarning, stacklevel=2)
    return Phase
