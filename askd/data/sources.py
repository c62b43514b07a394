"""Training data for ``askd.train``: the synthetic set or an image folder, a held-out evaluation set, batches.

``build_data(cfg)`` returns a :class:`TrainData`: the training Dataset (items uint8 (3,112,112), int
label), its identity count, and the held-out evaluation images uint8 (N,3,112,112) with labels (N,).
Synthetic data holds out a disjoint ``eval`` split; an image folder holds out the last ``eval_fraction``
of its identity folders in sorted order.

Batches are a pure function of (seed, epoch, position), so a resumed run sees the same batches as an
uninterrupted one: the epoch's permutation comes from a generator seeded with (seed, epoch), the last
partial batch is dropped (BatchNorm needs B > 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .folders import DataError, ImageFolderFaces, list_identities
from .synthetic import SyntheticFaces


@dataclass
class TrainData:
    train: Dataset
    num_classes: int
    eval_images: torch.Tensor  # uint8 (N,3,112,112)
    eval_labels: torch.Tensor  # int64 (N,)
    name: str

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = len(self.train) // batch_size
        if steps == 0:
            raise DataError(f"batch size {batch_size} is larger than the training set ({len(self.train)} images)")
        return steps

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train)} training images of {self.num_classes} identities, "
            f"{len(self.eval_labels)} held-out images of {len(self.eval_labels.unique())} identities"
        )


def build_data(cfg) -> TrainData:
    """The training and held-out data named by ``cfg.data`` ("synthetic" or an image-folder path)."""
    if cfg.data == "synthetic":
        return _synthetic(cfg)
    return _folder(cfg)


def _synthetic(cfg) -> TrainData:
    train = SyntheticFaces(cfg.synthetic_identities, cfg.synthetic_samples, seed=cfg.seed, split="train")
    held = SyntheticFaces(cfg.eval_identities, cfg.eval_samples, seed=cfg.seed, split="eval")
    index = torch.arange(len(held))
    labels = index // cfg.eval_samples
    images = held.render(labels, index % cfg.eval_samples)
    return TrainData(train, train.num_classes, images, labels, "synthetic faces")


def _folder(cfg) -> TrainData:
    root = Path(cfg.data)
    try:
        identities = list_identities(root)
        n_eval = max(2, round(len(identities) * cfg.eval_fraction))
        if len(identities) - n_eval < 2:
            raise DataError(
                f"{root} has {len(identities)} identity folders with images; need at least {n_eval + 2} "
                f"({n_eval} held out for evaluation at eval_fraction={cfg.eval_fraction}, 2 to train on)"
            )
        train = ImageFolderFaces(root, identities=identities[:-n_eval])
        held = ImageFolderFaces(root, identities=identities[-n_eval:])
        items = [held[i] for i in range(len(held))]
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise e if isinstance(e, DataError) else DataError(str(e)) from None
    images = torch.stack([img for img, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return TrainData(train, train.num_classes, images, labels, f"image folder {root}")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Index batches (steps, batch_size) of one epoch: a seeded permutation, last partial batch dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    steps = n // batch_size
    return perm[: steps * batch_size].view(steps, batch_size)


def iterate_batches(data: TrainData, cfg, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images uint8 (B,3,112,112), labels int64 (B,))`` of ``epoch`` from batch ``start`` on."""
    batches = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch)[start:]
    if isinstance(data.train, SyntheticFaces):
        # rendering a whole batch at once is ~3x faster than item by item, and needs no workers
        per = data.train.samples_per_identity
        for idx in batches:
            yield data.train.render(idx // per, idx % per), idx // per
        return
    loader = DataLoader(data.train, batch_sampler=batches.tolist(), num_workers=cfg.workers)
    yield from loader
