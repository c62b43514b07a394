"""Training data for ``askd.train``: the synthetic set, an image folder or a RecordIO pack; verification sets; batches.
For ``--task classify``: the shapes set, CIFAR or an ImageNet-style tree, and its validation split.

``build_data(cfg)`` returns a :class:`TrainData`: the training Dataset (items uint8 (3,112,112), int
label), its identity count, and the verification sets it is evaluated on, each a :class:`PairSet`.
Synthetic data holds out a disjoint ``eval`` split and an image folder the last ``eval_fraction`` of its
identity folders in sorted order, both as ``eval_pairs`` pairs of the held-out identities ("held-out"); a
RecordIO pack (a folder with ``train.rec``, ``train.idx``, ``property``) is evaluated on the ``*.bin`` files
beside it, as InsightFace packs ship them. ``eval_bins`` (a comma list of .bin files) replaces those sets
for any source. With ``val_fraction`` > 0 an image folder also holds out the last ``val_fraction`` of its
training identities as ``eval_pairs`` pairs ("val", after the held-out set): a validation split to choose
settings on, as the A-SKD paper did (20% of the training set), not trained on.

Batches are a pure function of (seed, epoch, position), so a resumed run sees the same batches as an
uninterrupted one: the epoch's permutation comes from a generator seeded with (seed, epoch), the last
partial batch is dropped (BatchNorm needs B > 1). Under torchrun each process takes its share of every
global batch, so the global order does not depend on the number of processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .cifar import SIDE as CIFAR_SIDE
from .cifar import is_cifar, read_cifar
from .classfolders import ClassFolders, is_class_folders
from .folders import DataError, ImageFolderFaces, split_identities, split_names
from .insightface import RecordDataset, pack_paths
from .pairs import make_pairs
from .shapes import ShapesDataset
from .synthetic import SyntheticFaces
from .verification_bin import pair_indices, read_bin_tensors


@dataclass
class PairSet:
    """Verification pairs: images uint8 (N,3,112,112); pair i is (idx_a[i], idx_b[i]), int64 (P,), issame bool (P,)."""

    images: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    issame: torch.Tensor

    def __len__(self) -> int:
        return len(self.issame)


@dataclass
class TrainData:
    train: Dataset
    num_classes: int
    eval_sets: dict[str, PairSet]  # name -> pairs; the first one also feeds the attention correlations
    name: str

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = len(self.train) // batch_size
        if steps == 0:
            raise DataError(f"batch size {batch_size} is larger than the training set ({len(self.train)} images)")
        return steps

    def describe(self) -> str:
        if all(isinstance(pairs, PairSet) for pairs in self.eval_sets.values()):
            sets = ", ".join(f"{name} ({len(pairs)} pairs)" for name, pairs in self.eval_sets.items())
            return f"{self.name}: {len(self.train)} training images of {self.num_classes} identities; " \
                   f"verification: {sets}"
        sets = ", ".join(f"{name} ({len(images)} images)" for name, images in self.eval_sets.items())
        return f"{self.name}: {len(self.train)} training images of {self.num_classes} classes; validation: {sets}"


def build_data(cfg) -> TrainData:
    """The training data named by ``cfg.data`` (synthetic, an image folder, a RecordIO pack), with its sets; for
    ``task = "classify"`` a classification source (:func:`classify_data`)."""
    if cfg.task == "classify":
        return classify_data(cfg)
    folder = cfg.data != "synthetic" and not is_pack(cfg.data)
    if cfg.val_fraction > 0 and not folder:
        raise DataError(f"val_fraction={cfg.val_fraction} splits an image folder's training identities; data "
                        f"{cfg.data!r} is not an image folder (use val_fraction=0)")
    data = _folder(cfg) if folder else _synthetic(cfg) if cfg.data == "synthetic" else _pack(cfg)
    if cfg.eval_bins:
        val = {"val": data.eval_sets["val"]} if "val" in data.eval_sets else {}
        data.eval_sets = {**bin_sets([b.strip() for b in cfg.eval_bins.split(",") if b.strip()]), **val}
    return data


def is_pack(path: str) -> bool:
    """Whether ``path`` names a RecordIO pack: a .rec file or a folder holding train.rec."""
    p = Path(path)
    return p.suffix == ".rec" or (p / "train.rec").is_file()


def possible_pairs(labels: torch.Tensor, wanted: int) -> int:
    """The largest even pair count <= ``wanted`` that has as many genuine pairs as it needs (half)."""
    genuine = sum(n * (n - 1) // 2 for n in Counter(labels.tolist()).values())
    return min(wanted, 2 * genuine) // 2 * 2


def pair_set(images: torch.Tensor, labels: torch.Tensor, cfg) -> PairSet:
    """``eval_pairs`` pairs (half genuine, fewer where there are not enough genuine ones) of images uint8
    (N,3,112,112) with identity labels int64 (N,)."""
    idx_a, idx_b, issame = make_pairs(labels, possible_pairs(labels, cfg.eval_pairs), seed=cfg.seed)
    return PairSet(images, idx_a, idx_b, torch.as_tensor(issame))


def bin_sets(paths: list[str | Path]) -> dict[str, PairSet]:
    """The verification .bin files as sets named by their stems (``agedb_30.bin`` -> "agedb_30")."""
    sets = {}
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"verification set {str(path)!r} not found (eval_bins, or a pack's *.bin)")
        images, issame = read_bin_tensors(path, size=112)
        sets[Path(path).stem] = PairSet(images, *pair_indices(len(issame)), issame)
    return sets


def _synthetic(cfg) -> TrainData:
    train = SyntheticFaces(cfg.synthetic_identities, cfg.synthetic_samples, seed=cfg.seed, split="train")
    held = SyntheticFaces(cfg.eval_identities, cfg.eval_samples, seed=cfg.seed, split="eval")
    index = torch.arange(len(held))
    labels = index // cfg.eval_samples
    images = held.render(labels, index % cfg.eval_samples)
    return TrainData(train, train.num_classes, {"held-out": pair_set(images, labels, cfg)}, "synthetic faces")


def _pack(cfg) -> TrainData:
    train = RecordDataset(cfg.data)
    bins = sorted(pack_paths(cfg.data)[0].parent.glob("*.bin"))
    if not bins and not cfg.eval_bins:
        raise DataError(
            f"RecordIO pack {cfg.data} has no verification .bin files beside train.rec; add some (python -m "
            f"askd.data.verification_bin make ...) or pass --set eval_bins=PATH.bin[,PATH.bin]"
        )
    sets = {} if cfg.eval_bins else bin_sets(bins)
    return TrainData(train, train.num_classes, sets, f"RecordIO pack {cfg.data}")


def _folder(cfg) -> TrainData:
    root = Path(cfg.data)
    try:
        train_ids, held_ids = split_identities(root, cfg.eval_fraction, "eval_fraction")
        groups = {"held-out": held_ids}
        if cfg.val_fraction > 0:
            # the last val_fraction of the training identities: pairs to choose settings on, so that the held-out
            # identities are only for the final numbers
            train_ids, groups["val"] = split_names(train_ids, cfg.val_fraction, "val_fraction",
                                                   f"the training identities of {root}")
        train = ImageFolderFaces(root, identities=train_ids)
        sets = {name: pair_set(*decoded(ImageFolderFaces(root, identities=ids)), cfg) for name, ids in groups.items()}
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise e if isinstance(e, DataError) else DataError(str(e)) from None
    return TrainData(train, train.num_classes, sets, f"image folder {root}")


def decoded(faces: ImageFolderFaces) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``faces`` decoded: (uint8 (N,3,112,112), labels int64 (N,))."""
    items = [faces[i] for i in range(len(faces))]
    return torch.stack([img for img, _ in items]), torch.tensor([label for _, label in items], dtype=torch.long)


def classify_data(cfg) -> TrainData:
    """``task = "classify"``: the shapes set ("synthetic"), a CIFAR-10/100 python folder, or an ImageNet-style
    tree ``train/<class>/*``, ``val/<class>/*``; evaluated on the validation split (CIFAR's test batch)."""
    side = cfg.input_side()
    if cfg.data == "synthetic":
        train = ShapesDataset(cfg.shapes_classes, cfg.shapes_samples, seed=cfg.seed, split="train", size=side)
        val = ShapesDataset(cfg.shapes_classes, cfg.shapes_val_samples, seed=cfg.seed, split="val", size=side)
        name = "synthetic shapes"
    elif is_cifar(cfg.data):
        if side != CIFAR_SIDE:
            raise DataError(f"CIFAR images are {CIFAR_SIDE} px; input_size {cfg.input_size} cannot be used with them")
        cifar = read_cifar(cfg.data, seed=cfg.seed)
        train, val, name = cifar.train, cifar.test, f"CIFAR-{cifar.train.num_classes} {cfg.data}"
    elif is_class_folders(cfg.data):
        tree = ClassFolders(cfg.data, size=side, seed=cfg.seed)
        train, val, name = tree.train, tree.val, f"image classes {cfg.data}"
    else:
        raise DataError(
            f"--task classify: data {cfg.data!r} is none of 'synthetic' (the shapes set), a CIFAR python folder "
            f"(cifar-10-batches-py, cifar-100-python) or an ImageNet-style tree with train/<class>/ and val/<class>/"
        )
    return TrainData(train, train.num_classes, {"val": val}, name)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Index batches (steps, batch_size) of one epoch: a seeded permutation, last partial batch dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    steps = n // batch_size
    return perm[: steps * batch_size].view(steps, batch_size)


def iterate_batches(
    data: TrainData, cfg, epoch: int, start: int = 0, share: slice = slice(None)
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images uint8 (b,3,112,112), labels int64 (b,))`` of ``epoch`` from batch ``start`` on: the rows
    ``share`` of each global batch of ``cfg.batch_size`` (one process of many takes its own share, see
    askd.distributed.World.share), all of it by default."""
    batches = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch)[start:, share]
    if isinstance(data.train, SyntheticFaces):
        # rendering a whole batch at once is ~3x faster than item by item, and needs no workers
        per = data.train.samples_per_identity
        for idx in batches:
            yield data.train.render(idx // per, idx % per), idx // per
        return
    if isinstance(data.train, ShapesDataset):
        per = data.train.samples  # the same for the shapes set: item i is sample i % per of class i // per
        for idx in batches:
            yield data.train.render(idx // per, idx % per, epoch), idx // per
        return
    keys = batches.tolist()
    if getattr(data.train, "augments", False):
        # (index, epoch): the dataset draws its augmentation from (seed, epoch, index), in whichever worker
        keys = [[(i, epoch) for i in batch] for batch in keys]
    yield from DataLoader(data.train, batch_sampler=keys, num_workers=cfg.workers)
