"""InsightFace RecordIO packs: the pack folder, its ``property`` file and ``RecordDataset``.

Pack layout (a folder with ``train.rec``, ``train.idx`` and ``property``, the text ``K,H,W``): record 0 is a
header (flag > 0, no image) whose label is (first identity key, end key); images are keys 1 .. first-1;
identity records, keys first .. end-1, each hold the [start, end) range of their image keys. Packs without
that header (key 0 missing or an image) hold only images: every key in the ``.idx``, in its order. Labels
are read from each image's own header (``int(label)``, or ``int(label[0])`` with extra labels), never from
the identity ranges, which are kept for reference only. Keys in those labels are float32, exact up to 2**24.
``property`` may be missing; then the identity count is the largest label + 1. The record format itself
(framing, .idx, image headers) is in askd.data.recordio.

A ``RecordDataset`` item is ``(image, label)``: image uint8 (3, size, size) RGB, resized like
``ImageFolderFaces`` when the stored image has another size; label an int. ``labels`` (int64 (N,)) reads only
the first bytes of each record, never an image. The ``.rec`` is opened lazily once per process, so a
Dataset shared with forked DataLoader workers never shares a file position; it pickles without the handle.
Bad data raises a DataError that names the file, the record key and byte offset, and what was expected.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .folders import DataError, load_image
from .recordio import (
    _LABEL_PREFIX,
    HEADER_SIZE,
    MAX_LABEL,
    IRHeader,
    RecordReader,
    _is_key,
    _label_of_prefix,
    unpack_header,
)


def _key_range(header: IRHeader) -> range | None:
    """The [start, end) key range in the label of a header or identity record, or None when it holds none."""
    if header.flag < 2 or not (_is_key(header.label[0]) and _is_key(header.label[1])):
        return None
    start, end = int(header.label[0]), int(header.label[1])
    return range(start, end) if start <= end else None


def pack_paths(path: str | Path) -> tuple[Path, Path, Path]:
    """(train.rec, train.idx, property) of a pack folder, or (X.rec, X.idx, property beside it) of a .rec."""
    path = Path(path)
    if path.is_dir():
        rec, idx = path / "train.rec", path / "train.idx"
    elif path.suffix == ".rec":
        rec, idx = path, path.with_suffix(".idx")
    else:
        raise DataError(f"RecordIO pack {str(path)!r} is neither a folder (with train.rec, train.idx and "
                        "property) nor a .rec file")
    for name in (rec, idx):
        if not name.is_file():
            raise DataError(f"RecordIO pack {str(path)!r}: missing {name.name} (expected {str(name)!r})")
    return rec, idx, rec.parent / "property"


def read_property(path: Path) -> tuple[int, int, int]:
    """(num_classes, height, width) from a ``property`` file holding ``K,H,W``."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise DataError(f"{path}: expected 'num_classes,height,width' (three positive integers), "
                        f"found {text[:80]!r}")
    return values


class RecordDataset(Dataset):
    """Faces from an InsightFace RecordIO pack (folder or .rec): items (uint8 (3,size,size) RGB, int label).

    Attributes: ``num_classes`` (from ``property``, else the largest label + 1), ``labels`` (int64 (N,),
    read on first use), ``identities`` (image-key ranges of the identity records; [] without a header),
    ``keys`` (the image record keys, in item order), ``prop`` ((K, H, W) from ``property``, or None) and
    ``reader``.
    """

    def __init__(self, path: str | Path, size: int = 112):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        rec, idx, prop = pack_paths(path)
        self.size, self.reader = size, RecordReader(rec, idx)
        self.prop = read_property(prop) if prop.is_file() else None
        self.keys, self._identity_keys = self._layout()
        self._offsets = self.reader.offsets(self.keys)
        self._labels: torch.Tensor | None = None
        self._identities: list[range] | None = None

    def _located(self, key: int, fn, *args):
        """``fn(*args)``, with the record's file, key and offset put in front of any DataError it raises."""
        try:
            return fn(*args)
        except DataError as err:
            raise DataError(f"{self.reader.where(key)}: {err}") from None

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(image keys, identity-record keys): from header record 0, or every key when there is none."""
        header = self._header0()
        if header is None:
            return self.reader.keys, np.zeros(0, np.int64)
        images = np.arange(1, header.start, dtype=np.int64)
        try:
            self.reader.offsets(images)
        except DataError as err:
            raise DataError(f"{self.reader.where(0)}: the header says images are keys 1..{header.start - 1}, "
                            f"but {err}") from None
        return images, np.arange(header.start, header.stop, dtype=np.int64)

    def _header0(self) -> range | None:
        """The identity-record key range when record 0 is an InsightFace header (extra labels, no image)."""
        if 0 not in self.reader:
            return None
        header, image = self._located(0, unpack_header, self.reader.read(0))
        if header.flag == 0 or image:
            return None
        keys = _key_range(header)
        if keys is None or keys.start < 1:
            raise DataError(f"{self.reader.where(0)}: header record label {header.label} is not "
                            "(first identity key >= 1, end key >= first)")
        return keys

    def _checked(self, key: int, label: int) -> int:
        """``label``, checked against the identity count in ``property``."""
        if self.prop is not None and label >= self.prop[0]:
            raise DataError(f"{self.reader.where(key)}: label {label}, but {self.reader.rec_path.parent}/property "
                            f"says {self.prop[0]} identities (labels 0..{self.prop[0] - 1})")
        return label

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,): every image's label, from the first bytes of its record (no image decoded); cached."""
        if self._labels is None:
            self._labels = torch.from_numpy(self._read_labels())
        return self._labels

    def _read_labels(self) -> np.ndarray:
        """int64 (N,) labels: the bulk prefixes where they are plain, the rest record by record."""
        prefix, ok = self.reader.prefixes(self._offsets, _LABEL_PREFIX)
        flag = np.ascontiguousarray(prefix[:, :4]).view("<u4")[:, 0]
        values = np.where(flag == 0, np.ascontiguousarray(prefix[:, 4:8]).view("<f4")[:, 0],
                          np.ascontiguousarray(prefix[:, HEADER_SIZE:]).view("<f4")[:, 0])
        limit = MAX_LABEL if self.prop is None else self.prop[0]
        with np.errstate(invalid="ignore"):  # NaN and inf fail the test below and are read again
            ok &= (values >= 0) & (values < limit) & (values == np.floor(values))
        labels = np.where(ok, values, 0).astype(np.int64)
        for i in np.flatnonzero(~ok).tolist():  # one by one, to get the exact label or the exact fault
            key, offset = int(self.keys[i]), int(self._offsets[i])
            prefix_i = self.reader.read(key, _LABEL_PREFIX, offset)
            labels[i] = self._checked(key, self._located(key, _label_of_prefix, prefix_i))
        return labels

    @property
    def num_classes(self) -> int:
        if self.prop is not None:
            return self.prop[0]
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def identities(self) -> list[range]:
        """The [start, end) image-key range held by each identity record, in key order; cached."""
        if self._identities is None:
            ranges = []
            for key in self._identity_keys.tolist():
                header, _ = self._located(key, unpack_header, self.reader.read(key))
                keys = _key_range(header)
                if keys is None:
                    raise DataError(f"{self.reader.where(key)}: identity record label {header.label} is not "
                                    "an image-key range (start, end)")
                ranges.append(keys)
            self._identities = ranges
        return self._identities

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        key, offset = int(self.keys[i]), int(self._offsets[i])
        header, image = self._located(key, unpack_header, self.reader.read(key, offset=offset))
        label = self._checked(key, self._located(key, lambda: header.class_label))
        try:
            pixels = load_image(io.BytesIO(image), self.size)
        except DataError as err:  # load_image names a BytesIO; name the record instead
            raise DataError(f"{self.reader.where(key)}: cannot decode its {len(image)}-byte image: "
                            f"{err.__cause__}") from err.__cause__
        return pixels, label
