"""Evaluation: pair verification (InsightFace and A-SKD protocols) and teacher-student attention similarity."""

from .attention import PearsonAccumulator, attention_correlation, pearson
from .verification import (
    ASKD_THRESHOLDS,
    INSIGHTFACE_THRESHOLDS,
    PROTOCOLS,
    askd_scores,
    best_threshold,
    combine_flip,
    evaluate_pairs,
    flip_features,
    fold_indices,
    insightface_distances,
    make_pairs,
    threshold_accuracies,
    verification_accuracy,
)

__all__ = [
    "ASKD_THRESHOLDS",
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
