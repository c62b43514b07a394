"""What a run learns: face recognition or image classification, each one :class:`Task` of :data:`TASKS`.

The pipeline, the loop and the step are the same for both; a task says how to build the model and its head,
how a batch becomes (embedding, maps, stage outputs), how the LR images are made, and how the trained models
are evaluated:

- ``face`` (DESIGN.md): IR-ResNet-CBAM embeddings (B,E) with an ArcFace head, LR by ``degrade`` (the variant's
  synthesis), 10-fold verification and the attention correlations (:mod:`askd.eval.report`).
- ``classify`` (the A-SKD paper's section 5.1): a ResNet-CBAM classifier; its "embedding" is the globally
  pooled feature (B,F) (what RKD and F-KD compare) and its head the model's own final Linear; LR by bicubic
  down- and up-sampling (:func:`askd.data.degrade.bicubic`); top-1/top-5 accuracy on the validation split and
  the attention correlations (:mod:`askd.eval.classify`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import models
from ..config import Config
from ..data import degrade
from ..data.degrade import bicubic
from ..eval import classify as classify_eval
from ..eval import report as face_eval
from ..nn import ArcFace, ClassifierHead


@dataclass(frozen=True)
class Task:
    """One kind of run; see the module docstring. Every function takes the run's config first."""

    name: str
    model_kwargs: Callable[[Config, int], dict]  # what models.create needs beyond arch/variant/embedding_size
    head: Callable[[Config, nn.Module, int], nn.Module]  # (cfg, model, classes) -> head(emb, labels) -> logits
    embed: Callable[[nn.Module, torch.Tensor, bool], tuple]  # (model, x, stages) -> (emb, maps, stages or None)
    low_res: Callable[[Config, torch.Tensor], torch.Tensor]  # (cfg, HR batch in [-1,1]) -> its LR version
    evaluate: Callable  # (cfg, data, teacher, students, device, assistants) -> results dict
    format_table: Callable[[dict], str]  # results dict -> Markdown
    evaluate_sets: Callable  # (cfg, model, data, transform, device) -> {set: accuracy}: the eval_every check
    eval_name: str  # what evaluate_sets measures, in words

    def build(self, cfg: Config, arch: str, num_classes: int, device: torch.device, backend=None):
        """A fresh model of ``arch`` and its head on ``device``."""
        model = models.create(arch, cfg.variant, cfg.embedding_size, backend=backend,
                              **self.model_kwargs(cfg, num_classes)).to(device)
        return model, self.head(cfg, model, num_classes).to(device)


def face_embed(model, x: torch.Tensor, stages: bool) -> tuple:
    """``(embedding, maps, stage outputs or None)``; the stage outputs only when asked."""
    if stages:
        return model(x, stages=True)
    emb, maps = model(x)
    return emb, maps, None


def classify_embed(model, x: torch.Tensor, stages: bool) -> tuple:
    """``(pooled features, maps, stage outputs or None)`` of a ResNet-CBAM classifier."""
    if stages:
        return model(x, stages=True, features=True)
    feats, maps = model(x, features=True)
    return feats, maps, None


def stem(cfg: Config) -> str:
    """The ResNet stem for the run's image size: CIFAR's (3x3, no max-pool) up to 64 px, ImageNet's above."""
    return "cifar" if cfg.input_side() <= 64 else "imagenet"


TASKS = {
    "face": Task(
        name="face",
        model_kwargs=lambda cfg, classes: {},
        head=lambda cfg, model, classes: ArcFace(cfg.embedding_size, classes, cfg.arcface_s, cfg.arcface_m),
        embed=face_embed,
        low_res=lambda cfg, x: degrade(x, cfg.low_res_side(), cfg.variant),
        evaluate=face_eval.evaluate_run,
        format_table=face_eval.format_table,
        evaluate_sets=face_eval.verify_accuracies,
        eval_name="verification",
    ),
    "classify": Task(
        name="classify",
        model_kwargs=lambda cfg, classes: {"num_classes": classes, "stem": stem(cfg)},
        head=lambda cfg, model, classes: ClassifierHead(model, classes),
        embed=classify_embed,
        low_res=lambda cfg, x: bicubic(x, cfg.low_res_side()),
        evaluate=classify_eval.evaluate_run,
        format_table=classify_eval.format_table,
        evaluate_sets=classify_eval.top1_accuracies,
        eval_name="top-1",
    ),
}


def task_of(cfg: Config) -> Task:
    return TASKS[cfg.task]
