"""The distillation methods of the A-SKD paper's comparison, one module each, behind one registry.

Each module holds a method's loss, written out and unweighted (importable from here), and the registered
:class:`~askd.losses.registry.Method` that weights it from the config. Why ``losses/`` and not a separate
``methods/``: a method is its formula plus a few lines that say what it needs and how it is weighted, so
both live in one file, and adding a method is that one file and its import here.
"""

from ..ops.cosine_distill import cosine_distance
from . import registry
from .at import at_cos_loss, at_loss, attention_map
from .attention_similarity import attention_distill_loss
from .fkd import fkd_loss
from .horkd import ClassCentres, horkd_loss
from .kd import kd_loss
from .registry import Method, Outputs, build
from .rkd import rkd_angle, rkd_distance, rkd_loss

__all__ = [
    "ClassCentres", "Method", "Outputs", "at_cos_loss", "at_loss", "attention_distill_loss", "attention_map",
    "build", "cosine_distance", "fkd_loss", "horkd_loss", "kd_loss", "registry", "rkd_angle", "rkd_distance",
    "rkd_loss",
]
