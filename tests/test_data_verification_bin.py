"""Verification .bin: round trips, Python 2 and numpy pickles, the restricted unpickler, errors, the make CLI."""

import io
import os
import pickle
import pickletools
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import askd.data.verification_bin as vb
from askd.data.folders import DataError, ImageFolderFaces
from askd.data.verification_bin import main, pair_indices, read_bin, read_bin_tensors, write_bin
from askd.eval import evaluate_pairs


def _random(n: int, h: int = 12, w: int = 10, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes for ``str`` images, memo left out:
    SHORT_BINSTRING / BINSTRING opcodes, which Python 3 turns into bytes only with ``encoding='bytes'``."""
    out = [pickle.PROTO, b"\x02", pickle.EMPTY_LIST, pickle.MARK]
    for b in bins:
        if len(b) < 256:
            out += [pickle.SHORT_BINSTRING, bytes([len(b)]), b]
        else:
            out += [pickle.BINSTRING, struct.pack("<i", len(b)), b]
    out += [pickle.APPENDS, pickle.EMPTY_LIST, pickle.MARK]
    out += [pickle.NEWTRUE if same else pickle.NEWFALSE for same in issame]
    out += [pickle.APPENDS, pickle.TUPLE2, pickle.STOP]
    return b"".join(out)


def _cv2_style(array: np.ndarray, shape: tuple[int, int] = (-1, 1)) -> np.ndarray:
    """JPEG bytes of ``array`` as ``cv2.imencode(".jpg", ...)[1]`` gives them: a uint8 (N,1) array (or ``shape``).

    Pillow encodes them, at OpenCV's default quality of 95.
    """
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return np.frombuffer(buf.getvalue(), np.uint8).reshape(shape)


def _jpeg_decoded(encoded: np.ndarray) -> np.ndarray:
    """uint8 (H,W,3) RGB of encoded bytes, decoded by Pillow directly: what read_bin must give for them."""
    with Image.open(io.BytesIO(encoded.tobytes())) as img:
        return np.array(img.convert("RGB"))


def _as_numpy1(data: bytes) -> bytes:
    """A protocol <= 3 pickle written by numpy 2, with every GLOBAL renamed from numpy._core to numpy.core.

    That is how numpy 1.x wrote the same objects; no numpy 1 needed. GLOBAL is a text opcode and protocol 3 has
    no frames, so only the renamed opcodes change; located by pickletools, never matched inside image bytes.
    """
    out, end = [], 0
    for op, arg, pos in pickletools.genops(data):
        if op.name == "GLOBAL" and arg.startswith("numpy._core."):
            module, name = arg.split(" ")
            out += [data[end:pos], b"c", module.replace("numpy._core.", "numpy.core.", 1).encode(), b"\n",
                    name.encode(), b"\n"]
            end = pos + len(module) + len(name) + 3  # the opcode byte and two newlines
    return b"".join(out) + data[end:]


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def _write(path, obj, protocol: int = 4):
    return _write_bytes(path, pickle.dumps(obj, protocol=protocol))


def _smooth(seed: int, h: int = 32, w: int = 24) -> np.ndarray:
    """(h, w, 3) uint8: random 4x4 colours upscaled, an image that JPEG keeps close."""
    small = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return np.array(small.resize((w, h), Image.Resampling.BILINEAR))


class _Flat(nn.Module):
    """A stand-in model: the flattened pixels as the embedding, no attention maps."""

    def forward(self, x):
        return x.flatten(1), None


# -------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_png_round_trip_is_bit_exact(tmp_path, protocol):
    images = _random(4) + _random(2, 6, 8, seed=1)  # the last pair has another size
    issame = [True, False, True]
    write_bin(tmp_path / "t.bin", images, issame, protocol=protocol)
    got, flags = read_bin(tmp_path / "t.bin")
    assert len(got) == 6 and all(g.dtype == np.uint8 and np.array_equal(g, a) for g, a in zip(got, images, strict=True))
    assert flags == issame and all(type(f) is bool for f in flags)


def test_tensor_round_trip_feeds_evaluate_pairs(tmp_path):
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    issame = torch.arange(10) % 2 == 0
    write_bin(tmp_path / "t.bin", images, issame)  # a (2P,3,H,W) tensor and a bool tensor
    got, flags = read_bin_tensors(tmp_path / "t.bin")
    assert got.dtype == torch.uint8 and torch.equal(got, images)
    assert flags.dtype == torch.bool and torch.equal(flags, issame)
    idx_a, idx_b = pair_indices(10)
    assert idx_a.tolist() == list(range(0, 20, 2)) and idx_b.tolist() == list(range(1, 20, 2))
    result = evaluate_pairs(_Flat(), got, idx_a, idx_b, flags, nfolds=2)
    assert 0 <= result["accuracy"] <= 1
    assert read_bin_tensors(tmp_path / "t.bin", size=4)[0].shape == (20, 3, 4, 4)


def test_jpeg_is_close(tmp_path):
    ramp = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3)).copy()
    write_bin(tmp_path / "t.bin", [ramp, ramp[::-1].copy()], [True], fmt="jpeg", quality=90)
    got, _ = read_bin(tmp_path / "t.bin")
    assert got[0].shape == (32, 32, 3)
    assert np.abs(got[0].astype(int) - ramp).mean() < 3


def test_size_resizes_every_image(tmp_path):
    write_bin(tmp_path / "t.bin", _random(2, 12, 10), [False])
    got, _ = read_bin(tmp_path / "t.bin", size=6)
    assert [g.shape for g in got] == [(6, 6, 3), (6, 6, 3)] and got[0].flags.c_contiguous
    with pytest.raises(ValueError, match="size must be None or a positive int"):
        read_bin(tmp_path / "t.bin", size=0)


def test_tensors_of_mixed_sizes_need_size(tmp_path):
    write_bin(tmp_path / "t.bin", _random(2) + _random(2, 6, 8), [True, False])
    with pytest.raises(DataError, match=r"image 2 is 8x6 but image 0 is 10x12; pass size="):
        read_bin_tensors(tmp_path / "t.bin")
    assert read_bin_tensors(tmp_path / "t.bin", size=5)[0].shape == (4, 3, 5, 5)


# --------------------------------------------------------------------------------- Python 2 and numpy files


def test_python2_str_pickle(tmp_path):
    rgb, tiny = _random(2), _random(1, 2, 2, seed=2)[0]
    grey = np.arange(120, dtype=np.uint8).reshape(12, 10)
    bins = [_encode(rgb[0]), _encode(tiny), _encode(grey), _encode(rgb[1], "JPEG")]
    assert len(bins[1]) < 256 <= len(bins[0])  # both SHORT_BINSTRING and BINSTRING
    data = _py2_pickle(bins, [True, False])
    with pytest.raises(UnicodeDecodeError):  # Python 2 str: the default ASCII decoding fails on image bytes
        pickle.loads(data)
    got, flags = read_bin(_write_bytes(tmp_path / "lfw.bin", data))
    assert np.array_equal(got[0], rgb[0]) and np.array_equal(got[1], tiny)
    assert got[2].shape == (12, 10, 3) and all(np.array_equal(got[2][..., c], grey) for c in range(3))
    assert got[3].shape == (12, 10, 3)
    assert flags == [True, False]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_array_pickle(tmp_path, protocol):
    images = _random(4)
    bins = [np.frombuffer(_encode(a), np.uint8) for a in images]
    issame = [np.bool_(True), np.bool_(False)]
    data = pickle.dumps((bins, issame), protocol=protocol)
    assert b"numpy" in data and (protocol > 2 or b"_codecs" in data)  # protocol 2 writes bytes via _codecs
    got, flags = read_bin(_write_bytes(tmp_path / "t.bin", data))
    assert all(np.array_equal(g, a) for g, a in zip(got, images, strict=True)) and flags == [True, False]
    # containers may be a tuple and a numpy bool array too
    got, flags = read_bin(_write(tmp_path / "u.bin", [tuple(bins), np.array([False, True])], protocol))
    assert np.array_equal(got[3], images[3]) and flags == [False, True]


def test_numpy_1x_module_paths(tmp_path):
    # numpy 1.x (and Python 2) name numpy.core.multiarray; numpy 2.x writes numpy._core.multiarray
    images = _random(2)
    data = pickle.dumps(([np.frombuffer(_encode(a), np.uint8) for a in images], [np.bool_(True)]), protocol=2)
    assert b"numpy._core.multiarray" in data
    old = data.replace(b"numpy._core.", b"numpy.core.")  # GLOBAL opcodes are text lines: no lengths to fix
    got, flags = read_bin(_write_bytes(tmp_path / "old.bin", old))
    assert np.array_equal(got[1], images[1]) and flags == [True]


@pytest.mark.parametrize("shape", [(-1, 1), (1, -1)])
def test_cv2_imencode_arrays(tmp_path, shape):
    # real InsightFace .bin files hold cv2.imencode output: (N,1) uint8 arrays of JPEG bytes
    images = [_smooth(seed) for seed in range(4)]
    bins = [_cv2_style(a, shape) for a in images]
    assert bins[0].ndim == 2 and 1 in bins[0].shape and bins[0].dtype == np.uint8
    got, flags = read_bin(_write(tmp_path / "cv2.bin", (bins, [True, False]), protocol=4))
    assert all(np.array_equal(g, _jpeg_decoded(b)) for g, b in zip(got, bins, strict=True)) and flags == [True, False]
    assert all(np.abs(g.astype(int) - a).mean() < 3 for g, a in zip(got, images, strict=True))  # the right images
    tensors, _ = read_bin_tensors(tmp_path / "cv2.bin")
    assert torch.equal(tensors[3], torch.from_numpy(got[3]).permute(2, 0, 1))


def test_numpy_1x_protocol_3_pickle(tmp_path):
    # what numpy 1.x's pickle.dump(..., protocol=3) wrote: GLOBAL opcodes naming numpy.core.multiarray
    images = [_smooth(seed) for seed in range(2)]
    bins = [_cv2_style(images[0]), _cv2_style(images[1], (1, -1))]
    data = _as_numpy1(pickle.dumps((bins, [np.bool_(True)]), protocol=3))
    assert data[:2] == b"\x80\x03" and b"numpy._core" not in data
    ops = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert ops == {"numpy.core.multiarray _reconstruct", "numpy.core.multiarray scalar", "numpy ndarray", "numpy dtype"}
    got, flags = read_bin(_write_bytes(tmp_path / "old3.bin", data))
    assert all(np.array_equal(g, _jpeg_decoded(b)) for g, b in zip(got, bins, strict=True)) and flags == [True]
    assert type(flags[0]) is bool


@pytest.mark.parametrize("name", ["numpy.core.multiarray fromfile", "numpy.core.numeric load", "numpy.core os"])
def test_numpy_core_allows_only_the_rebuilding_globals(tmp_path, name):
    data = b"\x80\x03c" + name.replace(" ", "\n").encode() + b"\n."
    with pytest.raises(DataError, match=rf"refusing to load global {re.escape(name.replace(' ', '.'))} from"):
        read_bin(_write_bytes(tmp_path / "g.bin", data))


# -------------------------------------------------------------------------------------- refused globals


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.eval": _Payload(eval, (f"open({str(marker)!r}, 'w').close()",)),
        "numpy.save": _Payload(np.save, (str(marker), np.zeros(1))),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "numpy.save"])
def test_malicious_global_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    png = _encode(_random(1)[0])
    for name, obj in {"top": payload, "inside": ([png, payload], [True])}.items():
        path = _write(tmp_path / f"{name}.bin", obj, protocol=2)
        with pytest.raises(DataError, match=rf"refusing to load global \S+ from verification \.bin .*{name}\.bin"):
            read_bin(path)
        assert not marker.exists()
    pickle.loads((tmp_path / "top.bin").read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists() or marker.with_suffix(".npy").exists()


def test_refusal_names_the_global(tmp_path):
    path = _write(tmp_path / "e.bin", _Payload(eval, ("1",)))
    with pytest.raises(DataError, match=r"refusing to load global builtins\.eval from .*e\.bin'"):
        read_bin(path)


def test_codecs_encode_only_rebuilds_latin1_bytes(tmp_path):
    rot13 = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DataError, match="does not rebuild a bytes object"):
        read_bin(_write_bytes(tmp_path / "r.bin", rot13))


# ----------------------------------------------------------------------------------------- file errors


def _png_pair():
    return [_encode(a) for a in _random(2)]


@pytest.mark.parametrize(
    "obj, message",
    [
        ((_png_pair() + _png_pair()[:1], [True]), r"holds 3 images; expected an even count"),
        ((_png_pair() * 2, [True]), r"holds 4 images \(2 pairs\) but 1 issame flags; expected one flag per pair"),
        (([], []), "holds no pairs"),
        ({"images": 1}, r"holds a dict; expected a 2-tuple \(images, issame\)"),
        ((_png_pair(), [True], None), r"holds a tuple of length 3; expected a 2-tuple"),
        (("ab", [True]), r"the image list is a str; expected a list"),
        ((_png_pair(), np.ones((1, 1), bool)), r"the issame list is an ndarray of shape \(1, 1\) bool"),
        (([_png_pair()[0], 5], [True]), r"image 1 is an int; expected encoded image bytes or a uint8 numpy array "
                                        r"of shape \(N,\), \(N, 1\) or \(1, N\)"),
        (([_png_pair()[0], np.zeros(3, np.float32)], [True]), r"image 1 is an ndarray of shape \(3,\) float32"),
        (([_png_pair()[0], _cv2_style(_random(1)[0]).astype(np.int8)], [True]), r"image 1 is an ndarray of shape "
                                                                                r"\(\d+, 1\) int8; expected"),
        (([_cv2_style(_random(1)[0]).astype(np.float32), b""], [True]), r"image 0 is an ndarray .* float32; expected"),
        (([_png_pair()[0], np.zeros((4, 6), np.uint8)], [True]), r"image 1 is an ndarray of shape \(4, 6\) uint8; "
                                                                 r"expected encoded image bytes or a uint8"),
        (([_png_pair()[0], np.zeros((8, 1, 1), np.uint8)], [True]), r"image 1 is an ndarray of shape \(8, 1, 1\)"),
        (([_png_pair()[0], np.uint8(7)], [True]), r"image 1 is a uint8; expected encoded image bytes"),
        (([_png_pair()[0], np.array(7, np.uint8)], [True]), r"image 1 is an ndarray of shape \(\) uint8"),
        ((_png_pair(), ["yes"]), r"issame\[0\] is 'yes' \(str\); expected a bool"),
        ((_png_pair(), [1]), r"issame\[0\] is 1 \(int\); expected a bool"),
    ],
)
def test_bad_structure_is_named(tmp_path, obj, message):
    path = _write(tmp_path / "bad.bin", obj)
    with pytest.raises(DataError, match=r"verification \.bin '.*bad\.bin'.*" + message):
        read_bin(path)


@pytest.mark.parametrize("size", [None, 8])
def test_undecodable_image_is_named(tmp_path, size):
    bins = _png_pair() * 2
    bins[1] = bins[1][: len(bins[1]) // 2]  # truncated
    bins[3] = b"not an image"
    with pytest.raises(DataError, match=r"bad\.bin'.*image 1 is not a decodable JPEG/PNG image"):
        read_bin(_write(tmp_path / "bad.bin", (bins, [True, False])), size=size)
    bins[1] = bins[0]
    with pytest.raises(DataError, match=r"image 3 is not a decodable JPEG/PNG image"):
        read_bin_tensors(_write(tmp_path / "bad.bin", (bins, [True, False])), size=size)


def test_not_a_pickle_truncated_and_missing(tmp_path):
    with pytest.raises(DataError, match=r"text\.bin' is not a readable pickle"):
        read_bin(_write_bytes(tmp_path / "text.bin", b"hello, not a pickle\n"))
    whole = pickle.dumps((_png_pair(), [True]), protocol=4)
    with pytest.raises(DataError, match=r"cut\.bin' is not a readable pickle"):
        read_bin(_write_bytes(tmp_path / "cut.bin", whole[: len(whole) // 2]))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.bin' does not exist"):
        read_bin(tmp_path / "nowhere.bin")


# --------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    "images, issame, kwargs, message",
    [
        (_random(1) + [np.zeros((12, 10, 3), np.float32)], [True], {}, r"images\[1\] must be a uint8 \(H,W,3\)"),
        ([torch.zeros(8, 8, 3, dtype=torch.uint8)] * 2, [True], {}, r"images\[0\] must be a uint8 \(3,H,W\) tensor"),
        ([np.zeros((8, 8), np.uint8)] * 2, [True], {}, r"images\[0\] must be a uint8 \(H,W,3\) numpy array"),
        ([[1, 2]] * 2, [True], {}, r"images\[0\] is a list; expected a uint8"),
        (_random(3), [True], {}, r"got 3 images for 1 issame flags; expected 2"),
        ([], [], {}, "issame is empty"),
        (_random(2), [1], {}, r"issame\[0\] is 1 \(int\); expected a bool"),
        (_random(2), np.ones((1, 1), bool), {}, r"issame must be 1-D"),
        (_random(2), [True], {"fmt": "gif"}, r"unknown image format 'gif'; expected one of \['png', 'jpeg'\]"),
        (_random(2), [True], {"quality": 0}, "quality must be an int in 1..100"),
        (_random(2), [True], {"protocol": 9}, "protocol must be an int in 0.."),
    ],
)
def test_write_rejects_bad_inputs_before_writing(tmp_path, images, issame, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_bin(tmp_path / "out.bin", images, issame, **kwargs)
    assert os.listdir(tmp_path) == []


def test_write_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder .*missing.* does not exist"):
        write_bin(tmp_path / "missing" / "out.bin", _random(2), [True])


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    write_bin(path, _random(2), [True])
    before = path.read_bytes()

    def crash(obj, f, protocol):
        f.write(b"\x80\x04half a file")
        raise OSError("disk full")

    monkeypatch.setattr(vb.pickle, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        write_bin(path, _random(2, seed=5), [False])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.bin"]  # no temporary file left


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def faces(tmp_path):
    """3 identities x 3 random 20x20 PNG images."""
    root = tmp_path / "faces"
    for k, name in enumerate(["ann", "ben", "cat"]):
        (root / name).mkdir(parents=True)
        for j, img in enumerate(_random(3, 20, 20, seed=10 * k)):
            Image.fromarray(img).save(root / name / f"{j}.png")
    return root


def test_make_writes_balanced_pairs_of_the_folder(faces, tmp_path, capsys):
    out = tmp_path / "pairs.bin"
    assert main(["make", str(faces), str(out), "--pairs", "8", "--seed", "3", "--size", "16"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 8 pairs (4 same) of")
    images, issame = read_bin(out)
    assert len(images) == 16 and len(issame) == 8 and sum(issame) == 4
    data = ImageFolderFaces(faces, 16)
    label_of = {img.permute(1, 2, 0).numpy().tobytes(): label for img, label in data}
    labels = [label_of[img.tobytes()] for img in images]  # PNG is exact: every image is one of the folder's
    assert issame == [labels[2 * i] == labels[2 * i + 1] for i in range(8)]
    assert all(not np.array_equal(images[2 * i], images[2 * i + 1]) for i in range(8))  # two distinct images
    again = tmp_path / "again.bin"
    assert main(["make", str(faces), str(again), "--pairs", "8", "--seed", "3", "--size", "16"]) == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic for a seed


def test_info_prints_what_a_file_holds(faces, tmp_path, capsys):
    out = tmp_path / "pairs.bin"
    main(["make", str(faces), str(out), "--pairs", "6", "--size", "16", "--format", "jpeg"])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: 6 pairs (3 same, 3 different), 12 images of 16x16\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["make", "{tmp}/nowhere", "{tmp}/o.bin", "--pairs", "4"], "image folder root .* does not exist"),
        (["make", "{faces}", "{tmp}/o.bin", "--pairs", "1"], "num_pairs must be >= 2"),
        (["make", "{faces}/ann", "{tmp}/o.bin", "--pairs", "4"], "no images found under"),
        (["make", "{faces}", "{tmp}/no/o.bin", "--pairs", "4"], "output folder .* does not exist"),
        (["info", "{tmp}/nowhere.bin"], r"nowhere\.bin' does not exist"),
        (["info", "{faces}/ann/0.png"], "is not a readable pickle"),
    ],
)
def test_cli_errors_are_one_line(faces, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, faces=faces) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("askd.data.verification_bin: error: ") and err.count("\n") == 1
    assert re.search(message, err)

