"""``python -m askd.train``: HR teacher -> frozen -> LR students (one per method) -> evaluation.

- :mod:`askd.train.cli`: the command line -> one resolved Config;
- :mod:`askd.train.pipeline`: the run folder, teacher -> [assistant] -> students -> evaluation;
- :mod:`askd.train.fit`: one model trained to its end (loop, log, checkpoints, resume);
- :mod:`askd.train.trainer`: one model's phase, state and training step.
"""

from .cli import main, parse_args
from .fit import fit
from .pipeline import load_frozen, run, teacher_forward
from .trainer import Stage, Trainer, build_model, freeze, lr_factor, random_flips, step_loss, to_input

__all__ = [
    "Stage", "Trainer", "build_model", "fit", "freeze", "load_frozen", "lr_factor", "main", "parse_args",
    "random_flips", "run", "step_loss", "teacher_forward", "to_input",
]
