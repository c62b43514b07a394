"""The view convention of the classification Datasets (shapes, CIFAR, class folders): ``ViewDataset`` and
``view_generator``.

``dataset[i]`` is the evaluation view of item i and ``dataset[(i, epoch)]`` the training view of that epoch, whose
randomness comes from a torch.Generator seeded by (seed, epoch, i) alone (:func:`view_generator`), so a resumed
run and any number of DataLoader workers see the same images. The horizontal flip is left to the training loop,
which flips whole batches.
"""

from __future__ import annotations

import operator

import torch
from torch.utils.data import Dataset

from .synthetic.sampling import _seed


def view_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of item ``index``'s training view in ``epoch``: a pure function of the three."""
    return torch.Generator().manual_seed(_seed("view", seed, epoch, index))


class ViewDataset(Dataset):
    """A classification Dataset with an evaluation view (``dataset[i]``) and a training view per epoch
    (``dataset[(i, epoch)]``); subclasses set ``num_classes``, ``classes``, ``size``, ``seed``, ``augments`` and
    define ``__len__``, ``eval_view(i)`` and ``train_view(i, epoch)``, each returning (uint8 (3,S,S), int).

    Where ``augments`` is False (evaluation sets) a (i, epoch) key gives the evaluation view too.
    """

    augments: bool

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if isinstance(key, (tuple, list)):
            if len(key) != 2:
                raise TypeError(f"a view key is an index or (index, epoch), got {key!r}")
            index, epoch = operator.index(key[0]), operator.index(key[1])
        else:
            index, epoch = operator.index(key), None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        if epoch is None or not self.augments:
            return self.eval_view(index)
        return self.train_view(index, epoch)

    def eval_view(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def train_view(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError
