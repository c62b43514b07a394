"""Running a model over images for evaluation: input checks and scaling, batching, eval mode, flip-TTA embeddings.

Shapes: images uint8 (N,3,H,W), fed to the model as float (B,3,H,W) in [-1,1] ``batch_size`` at a time; a
model returns ``(embedding (B,E), ...)``. ``Transform`` is the LR synthesis (or any per-image map) on such a
float batch. Shared by :mod:`askd.eval.verification`, :mod:`askd.eval.identification` and
:mod:`askd.eval.attention`; what the embeddings are scored by lives there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]


def check_images(images) -> torch.Tensor:
    """Return ``images`` (tensor or numpy) as a uint8 tensor (N,3,H,W), N >= 1, or raise ValueError."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"images must be uint8 (N,3,H,W) with N >= 1, got {tuple(images.shape)} {images.dtype}")
    return images


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 (B,3,H,W) in [-1,1], as the models are trained."""
    return images.float() / 127.5 - 1.0


def image_batches(images: torch.Tensor, batch_size: int, device) -> Iterator[torch.Tensor]:
    """Float model inputs in [-1,1] on ``device``, ``batch_size`` images (B,3,H,W) at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for batch in images.split(batch_size):
        yield to_model_input(batch.to(device))


@contextmanager
def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode for the block, then restore each one's train/eval flags."""
    modes = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, flags in zip(models, modes, strict=True):
            for m, flag in zip(model.modules(), flags, strict=True):
                m.training = flag


def flip_features(model: nn.Module, images, batch_size: int = 64, device="cpu", transform: Transform | None = None):
    """Embeddings of uint8 images (N,3,H,W) and of their horizontal flips: ``(feat (N,E), feat_flip (N,E))``.

    ``transform`` (e.g. ``lambda x: degrade(x, 14)``) acts on the float batch in [-1,1] after flipping,
    so the original and its flip get the same LR synthesis; it must treat images independently. The model
    runs in eval mode under ``torch.inference_mode()``; the outputs are fp32 CPU tensors.
    """
    images = check_images(images)
    feats, flips = [], []
    with eval_mode(model), torch.inference_mode():
        for x in image_batches(images, batch_size, device):
            views = torch.cat([x, x.flip(3)])  # dim 3 = width: a horizontal (mirror) flip
            if transform is not None:
                views = transform(views)
            emb = model(views)[0].float().cpu()
            feats.append(emb[: len(x)])
            flips.append(emb[len(x) :])
    return torch.cat(feats), torch.cat(flips)
