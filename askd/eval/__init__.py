"""Evaluation: pair verification (InsightFace and A-SKD protocols), identification (rank-k, mAP; TinyFace) and
teacher-student attention similarity. ``python -m askd.eval``: see :mod:`askd.eval.cli`.

Pair sampling and the TinyFace file lists are data (:mod:`askd.data.pairs`, :mod:`askd.data.tinyface`),
re-exported here."""

from ..data.pairs import make_pairs
from ..data.tinyface import DISTRACTOR_FOLDERS, DISTRACTOR_LABEL, load_tinyface, tinyface_lists
from .attention import PearsonAccumulator, attention_correlation, pearson
from .embed import flip_features
from .identification import RANKS, embed_files, evaluate_tinyface, identification_metrics
from .verification import (
    ASKD_THRESHOLDS,
    INSIGHTFACE_THRESHOLDS,
    PROTOCOLS,
    askd_scores,
    best_threshold,
    combine_flip,
    evaluate_pairs,
    fold_indices,
    insightface_distances,
    threshold_accuracies,
    verification_accuracy,
)

__all__ = [
    "ASKD_THRESHOLDS",
    "DISTRACTOR_FOLDERS",
    "DISTRACTOR_LABEL",
    "RANKS",
    "embed_files",
    "evaluate_tinyface",
    "identification_metrics",
    "load_tinyface",
    "tinyface_lists",
    "INSIGHTFACE_THRESHOLDS",
    "PROTOCOLS",
    "PearsonAccumulator",
    "askd_scores",
    "attention_correlation",
    "best_threshold",
    "combine_flip",
    "evaluate_pairs",
    "flip_features",
    "fold_indices",
    "insightface_distances",
    "make_pairs",
    "pearson",
    "threshold_accuracies",
    "verification_accuracy",
]
