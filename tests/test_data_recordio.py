"""RecordIO packs: framing (multi-part records), headers, the InsightFace layout, askd.data.pack, errors, workers."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from askd.data import ImageFolderFaces
from askd.data import pack as pack_module
from askd.data.folders import DataError
from askd.data.insightface import RecordDataset
from askd.data.pack import main, pack_folder
from askd.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    RecordReader,
    RecordWriter,
    frame,
    pack_header,
    unpack_header,
)


def _smooth_noise(rng, h=112, w=112) -> np.ndarray:
    """(h, w, 3) uint8: random 14x14 colours upscaled, so that JPEG keeps them well."""
    small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
    return np.array(small.resize((w, h), Image.Resampling.BILINEAR))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """ann: 2 images (one 100x130, resized on load), bob: 3, cy: 1; PNG noise."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for name, count in (("ann", 2), ("bob", 3), ("cy", 1)):
        (root / name).mkdir(parents=True)
        for j in range(count):
            shape = (130, 100) if (name, j) == ("ann", 1) else (112, 112)
            Image.fromarray(_smooth_noise(rng, *shape)).save(root / name / f"{j}.png")
    return root


def _write_pack(dst, records: dict[int, bytes], prop: str | None = None):
    """A pack folder holding ``records`` (key -> payload) in the given order, and a property file if given."""
    dst.mkdir(parents=True, exist_ok=True)
    with RecordWriter(dst / "train.rec", dst / "train.idx") as writer:
        for key, payload in records.items():
            writer.write(key, payload)
    if prop is not None:
        (dst / "property").write_text(prop)
    return dst


def _images(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(n)]


def _as_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)


def test_png_pack_reads_back_bit_exact(folder, tmp_path):
    info = pack_folder(folder, tmp_path / "pack", fmt="png")
    assert (info["images"], info["identities"], info["format"]) == (6, 3, "png")
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == ["property", "train.idx", "train.rec"]
    assert (tmp_path / "pack" / "property").read_text().strip() == "3,112,112"
    ref, data = ImageFolderFaces(folder), RecordDataset(tmp_path / "pack")
    assert len(data) == len(ref) == 6 and data.num_classes == 3
    for i in range(len(ref)):
        (want, want_label), (got, got_label) = ref[i], data[i]
        assert got.dtype == torch.uint8 and got.shape == (3, 112, 112)
        assert torch.equal(got, want) and got_label == want_label
    assert data.labels.tolist() == [label for _, label in ref.samples] == [0, 0, 1, 1, 1, 2]
    assert data.identities == [range(1, 3), range(3, 6), range(6, 7)]
    assert data.keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert len(RecordDataset(tmp_path / "pack" / "train.rec")) == 6  # the .rec path works as well


def test_jpeg_round_trip_is_close(folder, tmp_path):
    pack_folder(folder, tmp_path / "pack")  # JPEG, quality 95
    ref, data = ImageFolderFaces(folder), RecordDataset(tmp_path / "pack")
    diffs = [(data[i][0].float() - ref[i][0].float()).abs().mean().item() for i in range(len(ref))]
    assert max(diffs) < 3.0 and data.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert (tmp_path / "pack" / "train.rec").stat().st_size < 6 * 112 * 112 * 3 / 4  # really compressed


def test_size_option_resizes_and_records_it(folder, tmp_path):
    pack_folder(folder, tmp_path / "pack", fmt="png", size=64)
    assert (tmp_path / "pack" / "property").read_text().strip() == "3,64,64"
    ref = ImageFolderFaces(folder, size=64)
    assert torch.equal(RecordDataset(tmp_path / "pack", size=64)[1][0], ref[1][0])
    assert RecordDataset(tmp_path / "pack")[1][0].shape == (3, 112, 112)  # read at another size: resized


def test_multi_part_record_written_by_hand(tmp_path):
    first, middle, last = b"abcdefgh", b"wxyz", b"tail!"
    joined = first + MAGIC_BYTES + middle + MAGIC_BYTES + last

    def part(cflag: int, data: bytes) -> bytes:
        return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data + bytes(-len(data) % 4)

    plain = part(0, b"plain record")
    split = part(1, first) + part(2, middle) + part(3, last)
    (tmp_path / "x.rec").write_bytes(plain + split + plain)
    middle_at, end_at = len(plain) + len(part(1, first)), len(plain) + len(split)
    # 7: an offset into 9; opening frames only the first and last records, so reading 7 is what finds it
    (tmp_path / "x.idx").write_text(f"5\t0\n9\t{len(plain)}\n7\t{middle_at}\n8\t{end_at}\n")
    with RecordReader(tmp_path / "x.rec", tmp_path / "x.idx") as reader:
        assert reader.keys.tolist() == [5, 9, 7, 8]
        assert reader.read(5) == b"plain record" and reader.read(9) == joined
        assert reader.read(9, limit=3).startswith(b"abc")
        with pytest.raises(DataError, match=rf"record 7 at byte {middle_at}: continuation flag 2, expected one "
                                            r"of \[0, 1\]"):
            reader.read(7)
    assert frame(joined) == split  # the writer splits exactly as the hand-built record


@pytest.mark.parametrize("payload", [
    MAGIC_BYTES + b"after",  # empty first part
    b"1234" + MAGIC_BYTES + MAGIC_BYTES + b"56",  # empty middle part
    b"12345678" + MAGIC_BYTES,  # empty last part
    b"1" + MAGIC_BYTES + b"567",  # unaligned magic: not split
    b"",
])
def test_writer_and_reader_agree_on_edge_splits(tmp_path, payload):
    with RecordWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
        writer.write(0, payload)
        writer.write(1, b"next")
    raw = (tmp_path / "x.rec").read_bytes()
    assert len(raw) % 4 == 0
    unaligned = payload.find(MAGIC_BYTES) % 4 != 0
    assert (struct.unpack_from("<II", raw)[1] >> 29 == 0) == (MAGIC_BYTES not in payload or unaligned)
    reader = RecordReader(tmp_path / "x.rec", tmp_path / "x.idx")
    assert reader.read(0) == payload and reader.read(1) == b"next"


def test_header_split_by_a_magic_word_still_gives_its_label(tmp_path):
    images = _images(3)
    # id = MAGIC puts the magic word at aligned byte 8: the first part ends before the extra labels
    labels = [2, [1.0, 0.5], [0.0, 3.0]]
    payloads = {k + 1: pack_header(labels[k], id=MAGIC) + _png(images[k]) for k in range(3)}
    data = RecordDataset(_write_pack(tmp_path / "pack", payloads))
    assert data.labels.tolist() == [2, 1, 0]
    for i in range(3):
        assert torch.equal(data[i][0], _as_chw(images[i])) and data[i][1] == [2, 1, 0][i]


def test_pack_without_header_record(tmp_path):
    images, labels = _images(4), [2, 0, 1, 0]
    payloads = {k: pack_header(labels[k]) + _png(images[k]) for k in (0, 3, 1, 2)}  # idx order = item order
    data = RecordDataset(_write_pack(tmp_path / "pack", payloads))
    assert data.keys.tolist() == [0, 3, 1, 2] and data.identities == []
    assert data.labels.tolist() == [2, 0, 0, 1] and data.num_classes == 3  # no property: largest label + 1
    for i, key in enumerate([0, 3, 1, 2]):
        assert torch.equal(data[i][0], _as_chw(images[key])) and data[i][1] == labels[key]


def test_labels_come_from_the_records_not_the_identity_ranges(tmp_path):
    images, labels = _images(3), [2, 0, 1]
    records = {0: pack_header((4, 6))}
    records |= {k + 1: pack_header(labels[k], id=k + 1) + _png(images[k]) for k in range(3)}
    records |= {4: pack_header((1, 3)), 5: pack_header((3, 4))}  # ranges that say labels 0, 0, 1
    data = RecordDataset(_write_pack(tmp_path / "pack", records, "3,112,112"))
    assert data.identities == [range(1, 3), range(3, 4)]  # kept, but not used for labels
    assert data.labels.tolist() == [2, 0, 1] and [data[i][1] for i in range(3)] == [2, 0, 1]
    assert len(data) == 3 and data.num_classes == 3


def test_extra_labels(tmp_path):
    header, rest = unpack_header(pack_header([3.0, 0.5, -7.0], id=11, id2=12) + b"image")
    assert (header.flag, header.label, header.id, header.id2, rest) == (3, (3.0, 0.5, -7.0), 11, 12, b"image")
    assert header.class_label == 3
    header, rest = unpack_header(pack_header(np.float32(4.0)) + b"x")
    assert (header.flag, header.label, header.class_label, rest) == (0, 4.0, 4, b"x")
    assert unpack_header(pack_header(np.array([1.0, 2.0])))[0].label == (1.0, 2.0)
    images = _images(2)
    # key 0 with extra labels and an image is an image, not an InsightFace header record
    payloads = {0: pack_header([1.0, 9.5]) + _png(images[0]), 1: pack_header(0) + _png(images[1])}
    data = RecordDataset(_write_pack(tmp_path / "pack", payloads))
    assert data.keys.tolist() == [0, 1] and data.identities == []
    assert data.labels.tolist() == [1, 0] and data[0][1] == 1 and torch.equal(data[0][0], _as_chw(images[0]))


def _packed(folder, tmp_path):
    """(train.rec, train.idx, keys, offsets) of a PNG pack of ``folder``: header 0, images 1..6, identities 7..9."""
    pack_folder(folder, tmp_path / "pack", fmt="png")
    rec, idx = tmp_path / "pack" / "train.rec", tmp_path / "pack" / "train.idx"
    reader = RecordReader(rec, idx)  # a valid pack opens
    assert reader.keys.tolist() == list(range(10)) and reader.size == rec.stat().st_size
    return rec, idx, reader.keys.tolist(), reader.offsets(reader.keys).tolist()


def test_rec_cut_in_its_last_record_is_refused_at_open(folder, tmp_path):
    rec, _, keys, offsets = _packed(folder, tmp_path)
    size = rec.stat().st_size
    rec.write_bytes(rec.read_bytes()[:-5])
    with pytest.raises(DataError, match=rf"train\.rec: record {keys[-1]} at byte {offsets[-1]}: truncated: a part "
                                        rf"of \d+ bytes would end at byte {size}, past the end of the file "
                                        rf"\({size - 5} bytes\)"):
        RecordDataset(tmp_path / "pack")


def test_rec_cut_before_listed_records_is_refused_at_open(folder, tmp_path):
    rec, _, keys, offsets = _packed(folder, tmp_path)
    rec.write_bytes(rec.read_bytes()[: offsets[3] + 100])  # in record 3: records 4.. start past the end
    with pytest.raises(DataError, match=rf"train\.idx: record 4 at byte {offsets[4]}: past the end of .*train\.rec "
                                        rf"\({offsets[3] + 100} bytes\).*\(6 of 10 listed offsets are past it; is "
                                        r"train\.idx the index of this \.rec, or was the \.rec cut short\?\)"):
        RecordDataset(tmp_path / "pack")


def test_idx_offset_past_the_end_is_refused_at_open(folder, tmp_path):
    rec, idx, _, _ = _packed(folder, tmp_path)
    size = rec.stat().st_size
    idx.write_text(idx.read_text() + f"10\t{size + 400}\n")
    with pytest.raises(DataError, match=rf"train\.idx: record 10 at byte {size + 400}: past the end of .*train\.rec "
                                        rf"\({size} bytes\)"):
        RecordDataset(tmp_path / "pack")
    idx.write_text(idx.read_text().replace(f"\t{size + 400}\n", f"\t{size - 4}\n"))  # no room for a header
    with pytest.raises(DataError, match=rf"record 10 at byte {size - 4}: past the end"):
        RecordReader(rec, idx)


@pytest.mark.parametrize("swap, key, after", [((3, 4), 3, 4), ((0, 9), 1, 9)])
def test_idx_out_of_order_is_refused_at_open(folder, tmp_path, swap, key, after):
    _, idx, _, offsets = _packed(folder, tmp_path)
    lines = idx.read_text().splitlines(True)
    a, b = swap
    lines[a], lines[b] = lines[b], lines[a]  # key `key` is the first listed before a lower offset
    idx.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"train\.idx: record {key} at byte {offsets[key]} is listed after record "
                                        rf"{after} at byte {offsets[after]}; expected offsets increasing in \.idx "
                                        r"order, at least 8 bytes \(a frame header\) apart"):
        RecordDataset(tmp_path / "pack")


def test_idx_with_a_repeated_offset_is_refused_at_open(folder, tmp_path):
    _, idx, _, offsets = _packed(folder, tmp_path)
    idx.write_text(idx.read_text().replace(f"5\t{offsets[5]}\n", f"5\t{offsets[4]}\n"))
    with pytest.raises(DataError, match=rf"record 5 at byte {offsets[4]} is listed after record 4 at byte "
                                        rf"{offsets[4]}; expected offsets increasing"):
        RecordDataset(tmp_path / "pack")


def test_idx_listing_fewer_records_is_refused_at_open(folder, tmp_path):
    rec, idx, _, offsets = _packed(folder, tmp_path)
    lines = idx.read_text().splitlines(True)
    idx.write_text("".join(lines[:-1]))  # the last record not listed
    with pytest.raises(DataError, match=rf"train\.rec: record 8 at byte {offsets[8]}: the last record in "
                                        rf"train\.idx ends at byte {offsets[9]}, but the file has {rec.stat().st_size} "
                                        r"bytes \(the \.idx lists fewer records"):
        RecordDataset(tmp_path / "pack")
    idx.write_text("".join(lines[1:]))  # the first record not listed
    with pytest.raises(DataError, match=rf"train\.rec: record 1 at byte {offsets[1]}: the lowest offset in "
                                        r"train\.idx; expected a record at byte 0"):
        RecordDataset(tmp_path / "pack")
    idx.write_text("")
    with pytest.raises(DataError, match=rf"train\.idx lists no records, but .*train\.rec has {rec.stat().st_size}"):
        RecordDataset(tmp_path / "pack")


def test_trailing_bytes_after_the_last_record_are_refused_at_open(folder, tmp_path):
    rec, _, _, _ = _packed(folder, tmp_path)
    size = rec.stat().st_size
    rec.write_bytes(rec.read_bytes() + bytes(12))
    with pytest.raises(DataError, match=rf"ends at byte {size}, but the file has {size + 12} bytes"):
        RecordDataset(tmp_path / "pack")


def test_bad_frame_of_the_first_record_is_refused_at_open(folder, tmp_path):
    rec, _, _, _ = _packed(folder, tmp_path)
    raw = bytearray(rec.read_bytes())
    raw[0:4] = b"\0\0\0\0"
    rec.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train\.rec: record 0 at byte 0: bad magic 0x00000000"):
        RecordDataset(tmp_path / "pack")


def test_empty_pack_opens(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"")
    (tmp_path / "x.idx").write_text("")
    assert len(RecordReader(tmp_path / "x.rec", tmp_path / "x.idx")) == 0


def test_rec_shrunk_while_open_names_the_record(folder, tmp_path):
    rec, _, _, offsets = _packed(folder, tmp_path)
    data = RecordDataset(tmp_path / "pack")
    rec.write_bytes(rec.read_bytes()[: offsets[3] + 100])
    with pytest.raises(DataError, match=r"train\.rec: read \d+ of \d+ bytes at byte \d+; the file shrank while open"):
        data[2]
    with pytest.raises(DataError, match=r"train\.rec: \d+ bytes, \d+ when opened; the file shrank while open"):
        _ = data.labels
    assert data[1][1] == 0  # records before the cut still read


def test_bad_magic_names_the_record(folder, tmp_path):
    pack_folder(folder, tmp_path / "pack", fmt="png")
    rec = tmp_path / "pack" / "train.rec"
    offset = RecordReader(rec, tmp_path / "pack" / "train.idx").offset(2)
    raw = bytearray(rec.read_bytes())
    raw[offset : offset + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"train\.rec: record 2 at byte {offset}: bad magic 0x00000000, "
                                        r"expected 0xCED7230A"):
        RecordDataset(tmp_path / "pack")[1]


def test_corrupt_jpeg_names_the_record(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    payloads = {1: pack_header(0) + jpeg, 2: pack_header(0) + jpeg[: len(jpeg) // 2]}
    data = RecordDataset(_write_pack(tmp_path / "pack", payloads))
    offset = data.reader.offset(2)
    assert data[0][0].shape == (3, 112, 112)
    with pytest.raises(DataError, match=rf"train\.rec: record 2 at byte {offset}: cannot decode its \d+-byte"):
        data[1]


def test_missing_files_are_named(folder, tmp_path):
    pack_folder(folder, tmp_path / "pack", fmt="png")
    (tmp_path / "pack" / "train.idx").unlink()
    with pytest.raises(DataError, match=r"missing train\.idx"):
        RecordDataset(tmp_path / "pack")
    (tmp_path / "pack" / "train.rec").unlink()
    with pytest.raises(DataError, match=r"missing train\.rec"):
        RecordDataset(tmp_path / "pack")
    with pytest.raises(DataError, match="neither a folder"):
        RecordDataset(tmp_path / "nowhere")


def test_keys_missing_from_the_idx(folder, tmp_path):
    pack_folder(folder, tmp_path / "pack", fmt="png")
    idx = tmp_path / "pack" / "train.idx"
    with pytest.raises(DataError, match=r"train\.idx: no record key 99"):
        RecordReader(tmp_path / "pack" / "train.rec", idx).read(99)
    idx.write_text("".join(line for line in idx.read_text().splitlines(True) if not line.startswith("4\t")))
    with pytest.raises(DataError, match=r"record 0 at byte 0: the header says images are keys 1\.\.6, "
                                        r"but .*train\.idx: no record key 4"):
        RecordDataset(tmp_path / "pack")


@pytest.mark.parametrize("text, line", [("0\t0\nfoo\tbar\n", 2), ("0\t0\n1\t2\t3\n", 2), ("-1\t0\n", 1)])
def test_malformed_idx_line(tmp_path, text, line):
    _write_pack(tmp_path / "pack", {0: pack_header(0) + _png(_images(1)[0])})
    (tmp_path / "pack" / "train.idx").write_text(text)
    with pytest.raises(DataError, match=rf"train\.idx: line {line}: expected 'key<TAB>offset'"):
        RecordDataset(tmp_path / "pack")


def test_lenient_idx_whitespace_is_read(tmp_path):
    _write_pack(tmp_path / "pack", {0: pack_header(0) + _png(_images(1)[0])})
    (tmp_path / "pack" / "train.idx").write_text("0 0\r\n\n")
    assert RecordDataset(tmp_path / "pack").labels.tolist() == [0]


def test_property_mismatch(tmp_path):
    images = _images(3)
    payloads = {k: pack_header(k) + _png(images[k]) for k in range(3)}
    data = RecordDataset(_write_pack(tmp_path / "pack", payloads, "2,112,112"))
    with pytest.raises(DataError, match=r"record 2 at byte \d+: label 2, but .*property says 2 identities"):
        _ = data.labels
    with pytest.raises(DataError, match="property says 2 identities"):
        data[2]
    (tmp_path / "pack" / "property").write_text("two,112")
    with pytest.raises(DataError, match=r"property: expected 'num_classes,height,width'"):
        RecordDataset(tmp_path / "pack")


class _OwnHandleProbe(RecordDataset):
    """Items also say whether the reader's open .rec belongs to the process that read them."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return image, label, self.reader._pid == os.getpid()


@pytest.mark.parametrize("label", [-1.0, 2.5, float("nan")])
def test_labels_that_are_not_whole_non_negative_numbers(tmp_path, label):
    images = _images(2)
    payloads = {0: pack_header(0) + _png(images[0]), 1: pack_header([label, 0.0]) + _png(images[1])}
    data = RecordDataset(_write_pack(tmp_path / "pack", payloads))
    message = rf"record 1 at byte {data.reader.offset(1)}: label {label} is not a whole number"
    with pytest.raises(DataError, match=message):
        _ = data.labels
    with pytest.raises(DataError, match=message):
        data[1]


def test_dataloader_workers_and_pickling(folder, tmp_path):
    pack_folder(folder, tmp_path / "pack", fmt="png")
    data = _OwnHandleProbe(tmp_path / "pack")
    direct = [data[i][:2] for i in range(len(data))]  # opens the .rec in this process before the workers fork
    loader = DataLoader(data, batch_size=2, num_workers=2)
    images, labels, own = zip(*loader, strict=True)
    assert torch.equal(torch.cat(images), torch.stack([img for img, _ in direct]))
    assert torch.cat(labels).tolist() == [label for _, label in direct]
    assert torch.cat(own).all()  # each worker opened its own handle instead of sharing the parent's position
    copy = pickle.loads(pickle.dumps(data))
    assert torch.equal(copy[3][0], direct[3][0]) and copy[3][1] == direct[3][1]


def test_cli_packs_and_reports_bad_input(folder, tmp_path, capsys):
    assert main([str(folder), str(tmp_path / "pack"), "--format", "png"]) == 0
    assert "packed 6 images of 3 identities" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("askd.data.pack: error: ") and "missing" in err[-1]
    assert main([str(folder), str(tmp_path / "out"), "--quality", "0"]) == 2
    assert "quality" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.rec").exists()


def test_interrupted_pack_leaves_no_pack(folder, tmp_path, monkeypatch):
    calls = []

    def failing(image, fmt, quality):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return b"x"

    monkeypatch.setattr(pack_module, "encode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(folder, tmp_path / "pack")
    assert list((tmp_path / "pack").iterdir()) == []  # neither the files nor their temporaries


def test_repacking_replaces_an_older_pack(folder, tmp_path):
    _write_pack(tmp_path / "pack", {0: pack_header(0) + _png(_images(1)[0])}, "1,112,112")
    pack_folder(folder, tmp_path / "pack", fmt="png")
    data = RecordDataset(tmp_path / "pack")
    assert len(data) == 6 and data.num_classes == 3
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == ["property", "train.idx", "train.rec"]
