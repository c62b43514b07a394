"""``SyntheticFaces``, the Dataset: argument checks, and ``render``, which draws in chunks on one thread."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import Dataset

from .geometry import _layout, _windows
from .raster import Params, _draw
from .sampling import Draws, _identity, _jitter
from .textures import _marks, _textures

SPLITS = ("train", "eval")
CHUNK = 16  # images drawn together: amortises per-operation overhead, planes still fit in cache


class SyntheticFaces(Dataset):
    """Procedural cartoon faces: ``num_identities * samples_per_identity`` items of (uint8 (3,S,S), label).

    Item i is identity i // samples_per_identity (its label) and sample i % samples_per_identity.
    """

    def __init__(self, num_identities: int = 100, samples_per_identity: int = 20, seed: int = 0,
                 split: str = "train", size: int = 112):
        if not isinstance(num_identities, int) or num_identities < 1:
            raise ValueError(f"num_identities must be a positive int, got {num_identities!r}")
        if not isinstance(samples_per_identity, int) or samples_per_identity < 1:
            raise ValueError(f"samples_per_identity must be a positive int, got {samples_per_identity!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.num_identities, self.samples_per_identity = num_identities, samples_per_identity
        self.seed, self.split, self.size = seed, split, size
        self.num_classes = num_identities

    def __len__(self) -> int:
        return self.num_identities * self.samples_per_identity

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        identity, sample = divmod(i % len(self), self.samples_per_identity)
        return self.render(torch.tensor([identity]), torch.tensor([sample]))[0], identity

    def render(self, identities: torch.Tensor, samples: torch.Tensor, detail: bool = True) -> torch.Tensor:
        """Images uint8 (B,3,size,size) for identity and sample indices, integer (B,) each.

        Sample indices beyond samples_per_identity are valid (fresh jitter). ``detail=False`` leaves out the
        fine per-identity marks and changes nothing else (for ablations and tests).
        """
        ids, sams = self._check_indices(identities, samples)
        out = torch.empty(len(ids), 3, self.size, self.size, dtype=torch.uint8)
        with one_thread():
            for start in range(0, len(ids), CHUNK):
                stop = start + CHUNK
                out[start:stop] = self._render_chunk(ids[start:stop], sams[start:stop], detail)
        return out

    def _check_indices(self, identities, samples) -> tuple[list[int], list[int]]:
        identities, samples = torch.as_tensor(identities), torch.as_tensor(samples)
        if identities.dim() != 1 or identities.shape != samples.shape:
            raise ValueError(f"render expects identities and samples of one shape (B,), got "
                             f"{tuple(identities.shape)} and {tuple(samples.shape)}")
        if identities.is_floating_point() or samples.is_floating_point():
            raise ValueError(f"render expects integer indices, got {identities.dtype} and {samples.dtype}")
        ids, sams = identities.tolist(), samples.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.num_identities:
            raise ValueError(f"identities must be in [0, {self.num_identities}), got [{min(ids)}, {max(ids)}]")
        if sams and min(sams) < 0:
            raise ValueError(f"samples must be >= 0, got {min(sams)}")
        return ids, sams

    def _render_chunk(self, ids: list[int], sams: list[int], detail: bool) -> torch.Tensor:
        """uint8 (B,3,S,S) for up to CHUNK (identity, sample) pairs."""
        rows, boxes, marks, noise = [], [], [], []
        for identity, sample in zip(ids, sams, strict=True):
            draws = Draws(self.seed, self.split, identity)
            p = _identity(draws)
            if detail:
                marks.append(_marks(draws, p))
            draws = Draws(self.seed, self.split, identity, sample)
            p.update(_jitter(draws, self.size))
            boxes.append(_layout(p))
            rows.append(p)
            noise.append(torch.randn(self.size, self.size, generator=draws.generator))  # grey sensor noise
        windows = _windows(rows, boxes, self.size)
        p = Params(rows)
        img = _draw(p, _textures(p, marks) if detail else None, windows, self.size)
        img.add_(torch.stack(noise).mul_(p["noise"]).unsqueeze(1))
        return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


@contextlib.contextmanager
def one_thread():
    """Run torch single-threaded inside, restoring the thread count after.

    Drawing works on many small planes: intra-op threads add overhead, and stall badly (10-40x measured)
    when another process holds a core. Callers parallelise with DataLoader workers instead.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

