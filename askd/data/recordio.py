"""MXNet RecordIO without mxnet: record framing, the ``.idx`` index, image headers, ``RecordWriter``, ``RecordReader``.

Record framing (dmlc-core recordio, little-endian): uint32 magic 0xCED7230A, uint32 lrec (upper 3 bits the
continuation flag, lower 29 bits the part length), the part's bytes, zero padding to a multiple of 4. A
payload that holds the magic word at a 4-aligned position is split there and the magic dropped: flag 0 is a
whole record, 1 its first part, 2 a middle part, 3 the last part; the reader re-joins the parts with the
magic between them. The ``.idx`` file holds text lines ``key<TAB>offset``, the offset of a record's first
magic in the ``.rec``.

Image payload: the 24-byte header ``<IfQQ`` (uint32 flag, float32 label, uint64 id, uint64 id2); when
flag > 0, ``flag`` float32 labels follow and are the label; then the encoded image (JPEG or PNG). The
identity label (``IRHeader.class_label``) is ``int(label)``, or ``int(label[0])`` with extra labels.

The InsightFace pack layout on top of this (train.rec, train.idx, property; header and identity records;
``RecordDataset``) is in askd.data.insightface.

Bad data raises a DataError that names the file, the record key and byte offset, and what was expected.
RecordIO has no checksum: a flipped byte inside an image decodes to a slightly different image, without error.
Opening a ``RecordReader`` checks cheaply that its .idx and .rec agree (offsets against the file size, the
framing of the first and last records); a record's own framing is checked when it is read.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .folders import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_PART = (1 << 29) - 1  # the 29-bit length field
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3
_FRAME = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
HEADER_SIZE = _HEADER.size  # 24
_LABEL_PREFIX = HEADER_SIZE + 4  # the header and the first extra label: all a label needs
_CHUNK = 1 << 16  # records per bulk prefix read
MAX_LABEL = 1 << 31  # labels index a classifier's rows; anything larger is a corrupt header


def _padded(n: int) -> int:
    return (n + 3) & ~3


def frame(payload: bytes) -> bytes:
    """The bytes of one record holding ``payload``, split at every 4-aligned magic word as dmlc-core does."""
    view = memoryview(payload)
    parts, start, i = [], 0, payload.find(MAGIC_BYTES)
    while i >= 0:
        # only aligned words count, as in dmlc-core, whose reader looks for frames at 4-byte steps
        if i % 4 == 0:
            parts.append(view[start:i])
            start = i + 4
        i = payload.find(MAGIC_BYTES, max(start, i + 1))
    parts.append(view[start:])
    flags = [WHOLE] if len(parts) == 1 else [FIRST] + [MIDDLE] * (len(parts) - 2) + [LAST]
    out = bytearray()
    for flag, part in zip(flags, parts, strict=True):
        if len(part) > MAX_PART:
            raise ValueError(f"a record part of {len(part)} bytes exceeds the RecordIO limit of {MAX_PART}")
        out += _FRAME.pack(MAGIC, flag << 29 | len(part)) + part + bytes(_padded(len(part)) - len(part))
    return bytes(out)


class IRHeader(NamedTuple):
    """The header of an image record: ``label`` is a float, or a tuple of ``flag`` floats when flag > 0."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    @property
    def class_label(self) -> int:
        """The identity label: ``int(label)``, or ``int(label[0])`` with extra labels."""
        return _class_label(self.label if self.flag == 0 else self.label[0])


def _is_key(value: float) -> bool:
    """Whether a float32 label holds a label or record key: a whole number >= 0 (not NaN, not inf)."""
    return value >= 0 and float(value).is_integer()


def _class_label(value: float) -> int:
    if not (_is_key(value) and value < MAX_LABEL):
        raise DataError(f"label {value} is not a whole number in 0..{MAX_LABEL - 1}")
    return int(value)


def pack_header(label: float | Iterable[float], id: int = 0, id2: int = 0) -> bytes:
    """The header bytes of an image record (prepend them to the encoded image), as mxnet's ``recordio.pack``.

    A number is stored in the header (flag 0); a sequence (or array) of n numbers as n extra float32 labels
    (flag n, header label 0).
    """
    if isinstance(label, numbers.Real):  # numpy scalars too
        return _HEADER.pack(0, label, id, id2)
    values = [float(v) for v in label]
    if not values:
        raise ValueError("label sequence is empty; give a number or at least one label")
    return _HEADER.pack(len(values), 0.0, id, id2) + struct.pack(f"<{len(values)}f", *values)


def unpack_header(payload: bytes) -> tuple[IRHeader, bytes]:
    """``(header, image bytes)`` of an image record's payload; a DataError when it is too short."""
    if len(payload) < HEADER_SIZE:
        raise DataError(f"payload of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte image header")
    flag, label, id_, id2 = _HEADER.unpack_from(payload)
    end = HEADER_SIZE + 4 * flag
    if flag > 0:
        if len(payload) < end:
            raise DataError(f"header says {flag} extra labels ({end} bytes with the header) "
                            f"but the payload has {len(payload)} bytes")
        label = struct.unpack_from(f"<{flag}f", payload, HEADER_SIZE)
    return IRHeader(flag, label, id_, id2), payload[end:]


def _label_of_prefix(prefix: bytes) -> int:
    """The identity label from the first bytes of an image record (at least 28, or all of a shorter one)."""
    if len(prefix) < HEADER_SIZE:
        raise DataError(f"payload of {len(prefix)} bytes is shorter than the {HEADER_SIZE}-byte image header")
    flag, label = struct.unpack_from("<If", prefix)
    if flag == 0:
        return _class_label(label)
    if len(prefix) < _LABEL_PREFIX:
        raise DataError(f"header says {flag} extra labels but the payload ends after the header")
    return _class_label(struct.unpack_from("<f", prefix, HEADER_SIZE)[0])


class RecordWriter:
    """Writes records to ``rec_path`` and their ``key<TAB>offset`` lines to ``idx_path``; a context manager."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> int:
        """Append record ``key`` holding ``payload``; returns its byte offset in the .rec."""
        if not isinstance(key, int) or key < 0:
            raise ValueError(f"record key must be a non-negative int, got {key!r}")
        if key in self._keys:
            raise ValueError(f"record key {key} was already written to {self.rec_path}")
        offset = self._rec.tell()
        self._rec.write(frame(payload))
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_plain_idx(data: bytes) -> np.ndarray | None:
    """(L, 2) int64 of an .idx in the exact form writers produce ("digits<TAB>digits<LF>" lines), else None.

    A vectorised fast path: a 5.8M-line MS1M index parses in seconds instead of tens of seconds.
    """
    raw = np.frombuffer(data, np.uint8)
    sep = (raw == 9) | (raw == 10)
    if not len(raw) or raw[-1] != 10 or not (sep | ((raw >= 48) & (raw <= 57))).all():
        return None
    ends = np.flatnonzero(sep)
    kinds, digits = raw[ends], np.diff(ends, prepend=-1) - 1
    # 1..18 digits per field keeps every value within int64
    if len(ends) % 2 or (kinds[0::2] != 9).any() or (kinds[1::2] != 10).any() or digits.min() < 1 or digits.max() > 18:
        return None
    return np.fromstring(data.decode("ascii"), dtype=np.int64, sep=" ").reshape(-1, 2)


def _parse_idx_lines(path: Path, data: bytes) -> np.ndarray:
    """(L, 2) int64 of any .idx with two whitespace-separated integers a line (blank lines skipped)."""
    pairs = []
    for number, line in enumerate(data.decode("ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            key, offset = map(int, line.split())
        except ValueError:  # not two integers
            key = offset = -1
        if key < 0 or offset < 0:
            raise DataError(f"{path}: line {number}: expected 'key<TAB>offset' (two non-negative integers), "
                            f"found {line.strip()[:80]!r}")
        pairs.append((key, offset))
    return np.array(pairs, np.int64).reshape(-1, 2)


def read_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an .idx as int64 arrays in file order; a DataError naming the line if malformed."""
    data = path.read_bytes()
    pairs = _parse_plain_idx(data)
    if pairs is None:
        pairs = _parse_idx_lines(path, data)
    unique, counts = np.unique(pairs[:, 0], return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: record key {int(unique[counts > 1][0])} appears more than once")
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class RecordReader:
    """Random access to the records of ``rec_path`` through the offsets in ``idx_path``.

    ``keys`` (int64 (L,), .idx order); ``read(key)`` the joined payload; ``prefixes`` the first bytes of many
    records at once. Picklable; the .rec is opened on first use in each process.

    Opening checks that the two files agree (RecordIO has no checksum, so this is all the checking there is
    before a record is read): every offset inside the .rec and increasing in .idx order, the first record at
    byte 0 and the last ending at the end of the file, both with sound frames. A DataError says what disagrees.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise DataError(f"RecordIO file {str(path)!r} does not exist (a pack needs both "
                                f"{self.rec_path.name} and {self.idx_path.name})")
        self.keys, self._offsets = read_idx(self.idx_path)
        self._order = np.argsort(self.keys, kind="stable")
        self._sorted = self.keys[self._order]
        self.size = self.rec_path.stat().st_size
        self._file, self._pid = None, None
        try:
            self._check_layout()
        finally:  # keep the documented laziness: the .rec is opened on first use, not held from here on
            self.close()

    def _check_layout(self) -> None:
        """DataError unless the .idx and .rec agree: offsets in the file, increasing, first at 0, last ending at EOF.

        Cheap whatever the size of the .rec (RecordIO has no checksum, and reading a 100 GB file to check it is
        not an option): the offsets are checked in memory, and only the first and the last record are framed.
        """
        offsets = self._offsets
        if not len(offsets):
            if self.size:
                raise DataError(f"{self.idx_path} lists no records, but {self.rec_path} has {self.size} bytes")
            return
        self._check_offsets(offsets)
        first, last = 0, len(offsets) - 1  # increasing, so these are the lowest and highest offsets
        if offsets[first]:
            raise DataError(f"{self.where(int(self.keys[first]), int(offsets[first]))}: the lowest offset in "
                            f"{self.idx_path.name}; expected a record at byte 0 (the .idx lists fewer records than "
                            "the .rec holds)")
        self._span(int(self.keys[first]), int(offsets[first]))
        end = self._span(int(self.keys[last]), int(offsets[last]))
        if end != self.size:
            raise DataError(f"{self.where(int(self.keys[last]), int(offsets[last]))}: the last record in "
                            f"{self.idx_path.name} ends at byte {end}, but the file has {self.size} bytes "
                            f"(the .idx lists fewer records than the .rec holds, or the .rec has trailing data)")

    def _check_offsets(self, offsets: np.ndarray) -> None:
        """DataError naming the first .idx offset past the end of the .rec, or not after its predecessor's frame."""
        past = np.flatnonzero(offsets + _FRAME.size > self.size)
        if len(past):
            i = int(past[0])
            raise DataError(f"{self.idx_path}: record {int(self.keys[i])} at byte {int(offsets[i])}: past the end "
                            f"of {self.rec_path} ({self.size} bytes), which has no room there for an 8-byte frame "
                            f"header ({len(past)} of {len(offsets)} listed offsets are past it; is "
                            f"{self.idx_path.name} the index of this .rec, or was the .rec cut short?)")
        # writers list records in the order they append them, so each offset is past the previous frame header
        close = np.flatnonzero(np.diff(offsets) < _FRAME.size)
        if len(close):
            i = int(close[0]) + 1
            raise DataError(f"{self.idx_path}: record {int(self.keys[i])} at byte {int(offsets[i])} is listed after "
                            f"record {int(self.keys[i - 1])} at byte {int(offsets[i - 1])}; expected offsets "
                            f"increasing in .idx order, at least {_FRAME.size} bytes (a frame header) apart")

    def _span(self, key: int, start: int) -> int:
        """The byte just past record ``key`` at ``start``, its parts' frames checked as ``read`` checks them."""
        part, allowed = start, (WHOLE, FIRST)
        while True:
            length, cflag = self._frame(key, start, part, allowed)
            part += _FRAME.size + _padded(length)
            if cflag in (WHOLE, LAST):
                return part
            allowed = (MIDDLE, LAST)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        j = int(np.searchsorted(self._sorted, key))
        return j < len(self._sorted) and int(self._sorted[j]) == key

    def offsets(self, keys: np.ndarray) -> np.ndarray:
        """int64 byte offsets of ``keys``; a DataError naming the first key that the .idx does not list."""
        keys = np.asarray(keys, np.int64)
        j = np.searchsorted(self._sorted, keys).clip(max=max(len(self._sorted) - 1, 0))
        found = self._sorted[j] == keys if len(self._sorted) else np.zeros(len(keys), bool)
        if not found.all():
            raise DataError(f"{self.idx_path}: no record key {int(keys[~found][0])} "
                            f"({int((~found).sum())} of {len(keys)} keys asked for are not listed)")
        return self._offsets[self._order[j]]

    def offset(self, key: int) -> int:
        """Byte offset of record ``key``; a DataError when the .idx does not list it."""
        return int(self.offsets(np.array([key]))[0])

    def where(self, key: int, offset: int | None = None) -> str:
        """``"<rec>: record <key> at byte <offset>"``, the start of every message about that record."""
        return f"{self.rec_path}: record {key} at byte {self.offset(key) if offset is None else offset}"

    def read(self, key: int, limit: int | None = None, offset: int | None = None) -> bytes:
        """The payload of record ``key``, its parts joined; with ``limit``, at least its first ``limit`` bytes.

        ``offset``, when the caller has it, saves looking the key up.
        """
        start = part = self.offset(key) if offset is None else offset
        out = bytearray()
        allowed = (WHOLE, FIRST)
        while True:
            length, cflag = self._frame(key, start, part, allowed)
            want = length if limit is None else min(length, limit - len(out))
            out += self._pread(part + _FRAME.size, want)
            if cflag in (WHOLE, LAST) or (limit is not None and len(out) >= limit):
                return bytes(out)
            out += MAGIC_BYTES  # the writer dropped it where it split
            part += _FRAME.size + _padded(length)
            allowed = (MIDDLE, LAST)

    def _frame(self, key: int, start: int, part: int, allowed: tuple[int, ...]) -> tuple[int, int]:
        """(length, cflag) of the part at byte ``part``, checked against the magic, the flags and the file size."""
        if part + _FRAME.size > self.size:
            raise self._error(key, start, part, f"truncated: an 8-byte frame header would end past the end of "
                                                 f"the file ({self.size} bytes)")
        magic, lrec = _FRAME.unpack(self._pread(part, _FRAME.size))
        if magic != MAGIC:
            raise self._error(key, start, part, f"bad magic 0x{magic:08X}, expected 0x{MAGIC:08X} "
                                                 f"(is {self.idx_path.name} the index of this .rec?)")
        cflag, length = lrec >> 29, lrec & MAX_PART
        if cflag not in allowed:
            raise self._error(key, start, part, f"continuation flag {cflag}, expected one of {list(allowed)} "
                                                 "(0 whole, 1 first, 2 middle, 3 last part)")
        end = part + _FRAME.size + _padded(length)
        if end > self.size:
            raise self._error(key, start, part, f"truncated: a part of {length} bytes would end at byte {end}, "
                                                 f"past the end of the file ({self.size} bytes)")
        return length, cflag

    def _error(self, key: int, start: int, part: int, what: str) -> DataError:
        return DataError(f"{self.where(key, start)}{'' if part == start else f' (part at byte {part})'}: {what}")

    def prefixes(self, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (L, n) first payload bytes, bool (L,) ok) of the records at ``offsets``, read in bulk.

        ``ok`` is False where a record is not plainly readable that way (a bad or truncated frame, a first
        part shorter than n bytes, a continuation part); ``read`` those one by one, which explains faults.
        """
        out, ok = np.zeros((len(offsets), n), np.uint8), np.zeros(len(offsets), bool)
        if self.size < _FRAME.size + n:
            return out, ok
        rec = np.memmap(self.rec_path, np.uint8, mode="r")  # page faults, not Python calls, per record
        if len(rec) < self.size:  # the offsets were checked against the size at open; indexing would fail
            raise DataError(f"{self.rec_path}: {len(rec)} bytes, {self.size} when opened; the file shrank while open")
        for lo in range(0, len(offsets), _CHUNK):
            at = offsets[lo : lo + _CHUNK]
            inside = at + _FRAME.size + n <= self.size
            rows = rec[np.where(inside, at, 0)[:, None] + np.arange(_FRAME.size + n)]
            magic, lrec = np.ascontiguousarray(rows[:, : _FRAME.size]).view("<u4").T
            length = (lrec & MAX_PART).astype(np.int64)
            fits = at + _FRAME.size + (length + 3) // 4 * 4 <= self.size
            ok[lo : lo + _CHUNK] = inside & fits & (magic == MAGIC) & (lrec >> 29 <= FIRST) & (length >= n)
            out[lo : lo + _CHUNK] = rows[:, _FRAME.size :]
        del rec
        return out, ok

    def _pread(self, offset: int, n: int) -> bytes:
        if self._pid != os.getpid():  # first use here, or a forked worker: never share the parent's position
            self._file = open(self.rec_path, "rb", buffering=0)  # unbuffered: a buffer would read ahead for nothing
            self._pid = os.getpid()
        self._file.seek(offset)
        data = self._file.read(n)
        if len(data) != n:
            raise DataError(f"{self.rec_path}: read {len(data)} of {n} bytes at byte {offset}; "
                            "the file shrank while open")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}

