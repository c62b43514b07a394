"""The heads that turn a model's embedding into logits: ArcFace for faces, the classifier's own Linear for
``--task classify``. Both take ``(embedding, labels)`` and have ``predict(embedding)``: class scores without a
margin, what the training accuracy is measured on.

ArcFace margin head (Deng et al., CVPR 2019) with the authors' margin rule.

    cos_j = <e/|e|, w_j/|w_j|>                                       (B, N)
    phi   = cos(theta + m) = cos*cos(m) - sin*sin(m),   sin = sqrt(1 - cos^2)
    phi   = cos - sin(pi - m) * m      where cos <= cos(pi - m)     (keeps the target logit monotonic)
    out   = s * (phi on the label column, cos elsewhere)

The margin maths runs in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFace(nn.Module):
    """Additive angular margin logits for cross-entropy: embeddings (B,E), labels (B,) -> (B,N)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 32.0, m: float = 0.5):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"ArcFace needs embedding_size, num_classes >= 1, got {embedding_size}, {num_classes}")
        self.embedding_size, self.num_classes, self.s, self.m = embedding_size, num_classes, s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta) between normalised embeddings and class weights, fp32, (B,N)."""
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

    predict = cosine

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"ArcFace expects embeddings (B,{self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"ArcFace expects labels of shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = self.cosine(embeddings)
            # a floor instead of 0: at |cos| == 1 sqrt's slope is infinite and where() would turn 0 * inf into NaN
            sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
            phi = cos * self.cos_m - sin * self.sin_m
            phi = torch.where(cos > self.th, phi, cos - self.mm)
            target = F.one_hot(labels.long(), self.num_classes).bool()
            return torch.where(target, phi, cos) * self.s

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


class ClassifierHead(nn.Module):
    """The final Linear of a classifier (``model.forward_head``) as a head: features (B,F) -> logits (B,N),
    labels unused. It holds no parameters of its own (the Linear is the model's, saved and trained with it), so
    its state dict is empty; ``num_classes`` as ArcFace's."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: its parameters belong to the model
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_head(features)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features)
