"""Fuzzing the other public boundaries: the models, the data readers and the config.

Hypothesis draws the input; every case ends in a correct result or the boundary's own clear error, never another
exception type:

- models: ``askd.models.create`` with wrong names, variants, sizes and backends (ValueError), and forward with wrong
  shapes (ValueError) or, on valid input, the same embedding from the torch and the fused CBAM;
- data: corrupted bytes of an InsightFace RecordIO pack (``train.rec``, ``train.idx``, ``property``), of a
  verification ``.bin`` and of the images of an image folder, and pickles of arbitrary objects as ``.bin``: a
  ``DataError`` (a ValueError) that names the file, or data of the documented types and shapes (RecordIO has no
  checksum: a flipped byte inside a stored image may decode to another image without an error);
- config: ``askd.config.apply`` of any key with a value of any type, and ``load_toml`` of any bytes: a
  ``ConfigError`` that names the key (or the file), or a config holding the value in the field's type.

What the fuzzing found in the config (values a run cannot use, integers too large for a float) and in the model's
forward (another dtype, no tensor) is pinned by the tests at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from op_cases import backend_params
from PIL import Image

import askd.models
from askd.config import RENAMED_KEYS, Config, ConfigError, apply, load_toml
from askd.data import DataError, ImageFolderFaces, RecordDataset, read_bin, write_bin
from askd.data.pack import pack_folder
from askd.data.recordio import RecordWriter, pack_header

SIZE = 16  # the side the readers resize to: small, so that decoding stays cheap


# ---------------------------------------------------------------------------------------------------------------
# byte mutations, shared by every file format


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a drawn corruption: some bytes overwritten, cut short, grown, a run deleted, or replaced."""
    kind = draw(st.sampled_from(("overwrite", "truncate", "append", "delete", "replace")))
    event(f"mutation: {kind}")
    out = bytearray(data)
    if kind == "overwrite":
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del out[draw(st.integers(0, len(out) - 1)):]
    elif kind == "append":
        out += draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        start = draw(st.integers(0, len(out) - 1))
        del out[start : start + draw(st.integers(1, 64))]
    else:
        out = bytearray(draw(st.binary(max_size=256)))
    return bytes(out)


def _picture(seed: int, mode: str = "RGB") -> Image.Image:
    """A small smooth picture (so that JPEG keeps it), in PIL ``mode``."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((SIZE + 3, SIZE))
    return small.convert(mode)


def _encoded(seed: int, fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    _picture(seed, mode).save(buf, format=fmt)
    return buf.getvalue()


def check_image(pixels) -> None:
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape == (3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# RecordIO packs


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> dict[str, bytes]:
    """The files of a small InsightFace pack (header record, 2 identities, 5 JPEG images), name -> bytes."""
    root = tmp_path_factory.mktemp("faces")
    for identity, count in (("ann", 2), ("bob", 3)):
        (root / identity).mkdir()
        for j in range(count):
            _picture(j + 10 * count).save(root / identity / f"{j}.png")
    dst = tmp_path_factory.mktemp("pack")
    pack_folder(root, dst, size=SIZE)
    return {name: (dst / name).read_bytes() for name in ("train.rec", "train.idx", "property")}


def read_pack(folder: Path) -> None:
    """Everything a run reads of a pack: the layout, every label, the identity ranges, every image."""
    data = RecordDataset(folder, size=SIZE)
    labels = data.labels
    assert labels.dtype == torch.int64 and labels.shape == (len(data),)
    assert data.num_classes >= 0 and all(isinstance(r, range) for r in data.identities)
    for i in range(len(data)):
        pixels, label = data[i]
        check_image(pixels)
        assert isinstance(label, int) and label == labels[i]


@settings(max_examples=60)
@given(data=st.data())
def test_corrupt_recordio_pack(pack, data):
    name = data.draw(st.sampled_from(sorted(pack)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for file, content in pack.items():
            (folder / file).write_bytes(data.draw(mutated(content)) if file == name else content)
        try:
            read_pack(folder)
        except DataError as err:  # a ValueError naming the file
            assert str(folder) in str(err), err
            event(f"DataError: {name}")


def test_pack_reads_back_unmutated(pack, tmp_path):
    """The fuzzing's base pack is sound: every error above comes from a mutation."""
    for file, content in pack.items():
        (tmp_path / file).write_bytes(content)
    read_pack(tmp_path)
    assert RecordDataset(tmp_path, size=SIZE).labels.tolist() == [0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# verification .bin files


@pytest.fixture(scope="module")
def bin_bytes(tmp_path_factory) -> bytes:
    """A .bin of 2 pairs of small PNG images, numpy arrays of its bytes for one of them (as cv2 writes them)."""
    path = tmp_path_factory.mktemp("bin") / "pairs.bin"
    write_bin(path, [np.array(_picture(i)) for i in range(4)], [True, False])
    bins, issame = pickle.loads(path.read_bytes())
    bins[1] = np.frombuffer(bins[1], np.uint8)[:, None]  # cv2.imencode's (N, 1)
    return pickle.dumps((bins, issame), protocol=4)


def check_bin(path: Path) -> None:
    """read_bin on ``path``: 2P uint8 RGB images and P bools, or a DataError naming the file."""
    try:
        images, issame = read_bin(path, size=SIZE)
    except DataError as err:
        assert str(path) in str(err), err
        event("DataError")
        return
    assert len(images) == 2 * len(issame) > 0 and all(isinstance(f, bool) for f in issame)
    assert all(img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3) for img in images)


@settings(max_examples=60)
@given(data=st.data())
def test_corrupt_verification_bin(bin_bytes, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corrupt.bin"
        path.write_bytes(data.draw(mutated(bin_bytes)))
        check_bin(path)


# what a pickle may hold: plain data, bytes (perhaps a real image), numpy arrays; anything else needs a global
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(), st.text(max_size=8), st.binary(max_size=32),
    st.sampled_from([_encoded(1, "PNG"), _encoded(2, "JPEG")]), st.builds(np.bool_, st.booleans()),
    st.builds(lambda n, dt: np.arange(n).astype(dt), st.integers(0, 6), st.sampled_from(["uint8", "float32", "O"])),
)
PICKLED = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=5), st.tuples(inner, inner),
                                                     st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                       max_leaves=12)


@settings(max_examples=60)
@given(obj=PICKLED, protocol=st.sampled_from([2, 4, 5]))
def test_any_pickle_as_verification_bin(obj, protocol):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.bin"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        check_bin(path)


# ---------------------------------------------------------------------------------------------------------------
# image folders

IMAGE_KINDS = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"),
               ("JPEG", "L"), ("PPM", "L"), ("PPM", "RGB")]


@settings(max_examples=60)
@given(kind=st.sampled_from(IMAGE_KINDS), seed=st.integers(0, 3), data=st.data())
def test_corrupt_image_in_folder(kind, seed, data):
    fmt, mode = kind
    encoded = _encoded(seed, fmt, mode)
    content = data.draw(st.one_of(st.just(encoded), mutated(encoded)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "someone" / f"face.{ {'PPM': 'pgm', 'JPEG': 'jpg'}.get(fmt, 'png') }"
        path.parent.mkdir()
        path.write_bytes(content)
        faces = ImageFolderFaces(tmp, size=SIZE)
        try:
            pixels, label = faces[0]
        except DataError as err:
            assert str(path) in str(err), err
            event("DataError")
            return
        check_image(pixels)
        assert label == 0
        if content == encoded:
            event("unmutated")


# found by the fuzzing: a stored image whose header claims a huge size raised PIL's DecompressionBombError (no
# ValueError, no OSError), past the DataError of the readers, in a pack, a .bin or a folder
def huge_png() -> bytes:
    """A PNG whose header says 60000 x 60000 pixels (3.6 G, twice PIL's bomb limit), its checksum made to fit."""
    import struct
    import zlib

    png = bytearray(_encoded(0, "PNG"))
    png[16:24] = struct.pack(">II", 60000, 60000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_decompression_bomb_is_a_data_error(tmp_path):
    folder = tmp_path / "faces" / "someone"
    folder.mkdir(parents=True)
    (folder / "face.png").write_bytes(huge_png())
    with pytest.raises(DataError, match="could be decompression bomb"):
        ImageFolderFaces(tmp_path / "faces", size=SIZE)[0]
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_header(0) + huge_png())
    with pytest.raises(DataError, match="record 0 at byte 0: cannot decode its .* could be decompression bomb"):
        RecordDataset(tmp_path, size=SIZE)[0]
    path = tmp_path / "bomb.bin"
    write_bin(path, [np.array(_picture(i)) for i in range(2)], [True])
    bins, issame = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps(([huge_png(), bins[1]], issame)))
    with pytest.raises(DataError, match="image 0 is not a decodable"):
        read_bin(path, size=SIZE)


# ---------------------------------------------------------------------------------------------------------------
# models


@functools.cache
def tiny_model(backend: str) -> torch.nn.Module:
    """``ir_tiny_cbam`` in eval mode through ``backend``: the same weights for each (one seed, one build order)."""
    torch.manual_seed(0)
    return askd.models.create("ir_tiny_cbam", backend=backend).eval()


# argument -> (values create refuses, the message's start)
BAD_ARGUMENTS = {
    "name": (st.one_of(st.text(max_size=12).filter(lambda n: n not in askd.models.names()), st.integers(), st.none(),
                       st.lists(st.integers(), max_size=2)), r"unknown model"),
    "variant": (st.text(max_size=12).filter(lambda v: v not in ("official", "paper")), r"unknown variant"),
    "embedding_size": (st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans(),
                                 st.none()), r"embedding_size must be a positive int"),
    "backend": (st.text(max_size=8).filter(lambda b: b not in ("torch", "triton", "ext", "auto")), r"unknown backend"),
    "reduction": (st.integers(max_value=0), r"reduction >= 1"),
}


@settings(max_examples=30)
@given(data=st.data())
def test_create_model(data):
    kwargs = {"name": "ir_tiny_cbam", "variant": data.draw(st.sampled_from(("official", "paper"))),
              "embedding_size": data.draw(st.sampled_from((1, 7, 64))),
              "backend": data.draw(st.sampled_from((None, "torch", "ext", "auto"))),
              "reduction": data.draw(st.integers(1, 4))}
    bad = data.draw(st.one_of(st.none(), st.sampled_from(sorted(BAD_ARGUMENTS))))
    event(f"bad argument: {bad}")
    if bad is None:
        model = askd.models.create(kwargs.pop("name"), **kwargs).eval()
        emb, maps = model(torch.zeros(2, 3, 112, 112))
        assert emb.shape == (2, kwargs["embedding_size"]) and len(maps) == 4
        return
    values, message = BAD_ARGUMENTS[bad]
    kwargs[bad] = data.draw(values)
    with pytest.raises(ValueError, match=message):
        askd.models.create(kwargs.pop("name"), **kwargs)


@pytest.mark.parametrize("backend,device", backend_params(("ext",)))
@settings(max_examples=20)
@given(B=st.sampled_from((0, 1, 2)), layout=st.sampled_from(("contiguous", "channels_last")), nan=st.booleans(),
       shape=st.one_of(st.none(), st.sampled_from(((3, 112, 112, 1), (1, 112, 112), (4, 112, 112), (3, 56, 56),
                                                    (3, 112, 111), (3, 113, 112)))))
def test_model_forward(backend, device, B, layout, nan, shape):
    x = torch.rand(B, *(shape or (3, 112, 112)), generator=torch.Generator().manual_seed(B)) * 2 - 1
    if nan and x.numel():
        x.view(-1)[x.numel() // 3] = float("nan")
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if shape:
        with pytest.raises(ValueError, match=r"expected input of shape \(B,3,112,112\), got"):
            tiny_model(backend)(x)
        return
    with torch.no_grad():
        (emb, maps), (want, want_maps) = tiny_model(backend)(x), tiny_model("torch")(x)
    assert emb.shape == (B, 512)
    torch.testing.assert_close(emb, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert torch.equal(emb.isnan().any(1), x.isnan().flatten(1).any(1)), "NaN in the samples that hold one, only"
    for got, ref in zip([m for pair in maps for m in pair], [m for pair in want_maps for m in pair], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# config

CONFIG_FIELDS = sorted(f.name for f in dataclasses.fields(Config))
KEYS = st.one_of(st.sampled_from(CONFIG_FIELDS + sorted(RENAMED_KEYS)), st.text(max_size=12))
# what a TOML file or a caller can hand over; integers within TOML's 64 bits (larger ones: see the xfail below)
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=10),
    st.lists(st.one_of(st.floats(), st.integers(-10, 10), st.text(max_size=3), st.booleans()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def check_applied(updates: dict, source: str) -> None:
    """apply(Config(), updates): a ConfigError naming one of the keys (or the source), or a config holding each
    value in its field's type."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the renamed keys' old names
            cfg = apply(Config(), updates, source)
    except ConfigError as err:
        names = [n for key in updates for n in (key, RENAMED_KEYS.get(key))] + [source]
        assert any(isinstance(n, str) and n in str(err) for n in names), err
        event("ConfigError")
        return
    for key in updates:
        field = RENAMED_KEYS.get(key, key)
        value, default = getattr(cfg, field), getattr(Config(), field)
        assert type(value) is type(default), (field, value)
        assert not isinstance(value, list) or all(type(v) is float for v in value), (field, value)


@settings(max_examples=120)
@given(key=KEYS, value=VALUES)
def test_config_apply_any_value(key, value):
    check_applied({key: value}, "fuzz")


@settings(max_examples=60)
@given(key=KEYS, text=st.one_of(st.text(max_size=12), st.sampled_from(["1e3", "nan", "-inf", "0x10", "true", "[1, 2]",
                                                                       "0.5,0.7", ""])))
def test_config_set_any_text(key, text):
    check_applied({key: text}, "--set")  # --set key=value hands every value over as text


# TOML literals of every type, for the files
TOML_VALUES = st.sampled_from(['1', '-3', '0', '1.5', 'nan', '-inf', 'true', '"text"', '""', '[0.5, 0.7]', '[]',
                               '[1, "a"]', '{ a = 1 }', '1979-05-27', '"ir50_cbam"', '"askd+kd"',
                               '9223372036854775807'])


@settings(max_examples=60)
@given(lines=st.lists(st.tuples(KEYS.filter(str.isidentifier), TOML_VALUES), max_size=4), noise=st.binary(max_size=16))
def test_config_file(lines, noise):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        text = "".join(f"{key} = {value}\n" for key, value in lines)
        path.write_bytes(text.encode() + noise)
        try:
            data = load_toml(path)
        except ConfigError as err:
            assert str(path) in str(err), err
            event("unreadable file")
            return
        check_applied(data, str(path))


# ---------------------------------------------------------------------------------------------------------------
# found by the fuzzing: what the config and the model's forward let through before they checked it

# config key, value: what apply lets through although a run cannot use it, or raises on with another error
UNUSABLE = {
    "log_every-0": ("log_every", 0),  # a ZeroDivisionError at the first step (step % log_every)
    "workers-negative": ("workers", -1),  # DataLoader's ValueError once the data loads
    "lr-nan": ("lr", "nan"),  # NaN weights after the first step, silently
    "weight-inf": ("distill_weight", float("inf")),  # an infinite loss, silently
    "kd_temperature-0": ("kd_temperature", 0.0),  # kd_loss's ValueError at the first step of a kd student
    "int-too-large": ("lr", 10**400),  # an OverflowError from float(), no ConfigError
    "list-int-too-large": ("milestones", [10**400]),  # the same
}


@pytest.mark.parametrize("key,value", UNUSABLE.values(), ids=list(UNUSABLE))
def test_config_refuses_unusable_values(key, value):
    with pytest.raises(ConfigError, match=key):
        apply(Config(), {key: value}, "fuzz")


WRONG_INPUTS = {
    "uint8": torch.zeros(1, 3, 112, 112, dtype=torch.uint8),  # images as read, not normalised
    "float64": torch.zeros(1, 3, 112, 112, dtype=torch.float64),
    "bfloat16": torch.zeros(1, 3, 112, 112, dtype=torch.bfloat16),  # outside autocast
    "list": [[0.0] * 112] * 3,
}


@pytest.mark.parametrize("x", WRONG_INPUTS.values(), ids=list(WRONG_INPUTS))
def test_model_refuses_wrong_input_types(x):
    with pytest.raises((ValueError, TypeError), match=r"expected input"):
        tiny_model("torch")(x)
