"""InsightFace verification ``.bin`` files (lfw.bin, agedb_30.bin, cfp_fp.bin, ...), read and written without mxnet.

Format: a pickle of ``(bins, issame)``, a 2-tuple or list. ``bins`` holds 2P encoded images (JPEG or PNG
bytes); images 2i and 2i+1 form pair i, and ``issame`` holds P bools (True: one identity). Files written by
Python 2 hold ``str`` objects, which load as bytes with ``encoding='bytes'``; newer files may hold numpy uint8
arrays of the encoded bytes, (N,) or the (N,1) that ``cv2.imencode`` gives, and numpy bools instead. Both kinds
are read, as are the ``numpy.core`` globals of numpy 1.x pickles under numpy 2.

A .bin is untrusted input, and unpickling can run any callable the file names. :func:`read_bin` therefore
uses a restricted unpickler that resolves only the numpy globals that rebuild arrays, dtypes and scalars,
plus the two calls (``_codecs.encode`` to latin1, ``bytes()``) that pickles of protocol < 3 use for bytes.
Any other global is refused with a DataError before it is called.

Shapes: :func:`read_bin` gives uint8 (H,W,3) RGB numpy arrays and bools; :func:`read_bin_tensors` gives a
uint8 (N,3,H,W) tensor and a bool (P,) tensor, N = 2P, and :func:`pair_indices` the ``idx_a, idx_b`` (P,)
that ``askd.eval.evaluate_pairs`` takes with them. Grey images become three identical channels; ``size``
resizes by the rule of ``askd.data.folders`` (shorter side to ``size``, then a centre crop).
:func:`write_bin` writes (list of encoded bytes, list of bools) atomically.

CLI: ``python -m askd.data.verification_bin make ROOT OUT.bin --pairs N --seed S`` samples balanced pairs
from ``ROOT/<identity>/<image>``; ``python -m askd.data.verification_bin info FILE.bin`` checks a file.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import replacing
from . import safe_pickle
from .folders import ENCODINGS, DataError, ImageFolderFaces, check_encoding, encode_image, load_image
from .pairs import make_pairs

PROG = "askd.data.verification_bin"
PROTOCOL = 4  # compact bytes opcodes; protocol=2 also suits Python 2 readers, at about 1.5x the size

# ------------------------------------------------------------------------------------------- unpickling


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as protocol < 3 pickles of bytes call it: ``encode(str, 'latin1')``, nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise ValueError(f"_codecs.encode({type(text).__name__}, {encoding!r}) does not rebuild a bytes object")
    return text.encode("latin1")


def _empty_bytes():
    """``bytes()``, as protocol < 3 pickles of ``b''`` call it."""
    return b""


def _safe_globals() -> dict[tuple[str, str], object]:
    """The globals a .bin may name: numpy's arrays, dtypes and scalars, and the two calls for bytes."""
    allowed = safe_pickle.numpy_globals(scalars=True)
    allowed["_codecs", "encode"] = _latin1_encode
    for builtins in ("builtins", "__builtin__"):  # Python 3 writes the Python 2 name for protocol < 3
        allowed[builtins, "bytes"] = _empty_bytes
    return allowed


_SAFE_GLOBALS = _safe_globals()
HOLDS = "a verification .bin holds only encoded images (bytes or numpy uint8 arrays) and bools"


def _where(path: Path) -> str:
    return f"verification .bin {str(path)!r}"


def _unpickle(path: Path) -> object:
    """The object pickled in ``path``, loaded by the restricted unpickler; DataError if it is no pickle."""
    if not path.exists():
        raise FileNotFoundError(f"{_where(path)} does not exist")
    return safe_pickle.load(path, _SAFE_GLOBALS, _where(path), HOLDS)


def _describe(obj) -> str:
    """'a list of length 3', 'an int', ... for error messages."""
    name = type(obj).__name__
    article = "an" if name[0] in "aeio" else "a"  # "a uint8"
    if isinstance(obj, np.ndarray):
        return f"an ndarray of shape {obj.shape} {obj.dtype}"
    if isinstance(obj, (list, tuple)):
        return f"{article} {name} of length {len(obj)}"
    return f"{article} {name}"


def _as_list(obj, what: str, where: str) -> list:
    """``obj`` (list, tuple or 1-D numpy array) as a list of its items."""
    if isinstance(obj, (list, tuple)) or (isinstance(obj, np.ndarray) and obj.ndim == 1):
        return list(obj)
    raise DataError(f"{where}: {what} is {_describe(obj)}; expected a list")


def _flag(item, i: int, where: str) -> bool:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    raise DataError(f"{where}: issame[{i}] is {item!r} ({type(item).__name__}); expected a bool")


def _split(obj, where: str) -> tuple[list, list[bool]]:
    """Validated ``(bins, issame)`` of an unpickled .bin: 2P encoded items and P bools, P >= 1."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{where} holds {_describe(obj)}; expected a 2-tuple (images, issame)")
    bins, issame = _as_list(obj[0], "the image list", where), _as_list(obj[1], "the issame list", where)
    if len(bins) % 2:
        raise DataError(f"{where} holds {len(bins)} images; expected an even count (images 2i, 2i+1 form pair i)")
    if len(issame) != len(bins) // 2:
        raise DataError(f"{where} holds {len(bins)} images ({len(bins) // 2} pairs) but {len(issame)} issame "
                        "flags; expected one flag per pair")
    if not bins:
        raise DataError(f"{where} holds no pairs")
    return bins, [_flag(item, i, where) for i, item in enumerate(issame)]


# --------------------------------------------------------------------------------------------- decoding


def _is_byte_vector(item) -> bool:
    """Whether ``item`` is a uint8 numpy array of shape (N,), (N,1) or (1,N): one run of encoded bytes.

    ``cv2.imencode(...)[1]`` gives (N,1), which real InsightFace .bin files hold. Any strides will do:
    ``tobytes`` reads in logical order, and a single row or column has only one such order.
    """
    if not isinstance(item, np.ndarray) or item.dtype != np.uint8:
        return False
    return item.ndim == 1 or (item.ndim == 2 and 1 in item.shape)


def _encoded(item, i: int, where: str) -> bytes:
    """The encoded bytes of image item ``i``: bytes (Python 2 str) or a uint8 numpy array (N,), (N,1) or (1,N)."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if _is_byte_vector(item):
        return item.tobytes()
    raise DataError(f"{where}: image {i} is {_describe(item)}; expected encoded image bytes or a uint8 numpy "
                    "array of shape (N,), (N, 1) or (1, N) holding them")


def _decode(data: bytes, size: int | None) -> np.ndarray:
    """uint8 (H,W,3) RGB of one encoded image; with ``size``, (size,size,3) by the folders resize rule."""
    if size is not None:  # load_image opens any file object and owns the resize rule
        return np.ascontiguousarray(load_image(io.BytesIO(data), size).permute(1, 2, 0).numpy())
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))  # L replicates into three channels


def _decoded(bins: list, where: str, size: int | None) -> Iterator[np.ndarray]:
    """The images of ``bins`` decoded one by one, a DataError naming the index of any that fails."""
    for i, item in enumerate(bins):
        data = _encoded(item, i, where)
        try:
            img = _decode(data, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's decode errors
            reason = err.__cause__ if isinstance(err, DataError) else err  # load_image's names a BytesIO
            raise DataError(f"{where}: image {i} is not a decodable JPEG/PNG image: {reason}") from err
        yield img


def _check_size(size) -> None:
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be None or a positive int, got {size!r}")


def _load(path: str | Path) -> tuple[list, list[bool], str]:
    """``(bins, issame, where)`` of the validated structure of the .bin at ``path``, images not yet decoded."""
    path = Path(path)
    where = _where(path)
    bins, issame = _split(_unpickle(path), where)
    return bins, issame, where


def read_bin(path: str | Path, size: int | None = None) -> tuple[list[np.ndarray], list[bool]]:
    """Images and pair labels of a verification .bin: ``([2P uint8 (H,W,3) RGB arrays], [P bools])``.

    Images 2i and 2i+1 form pair i. ``size`` resizes every image to (size, size, 3). Raises
    FileNotFoundError for a missing file and DataError (a ValueError) naming the file, and the item where
    there is one, for anything else: not a pickle, a refused global, a wrong structure or count, an
    image that does not decode.
    """
    _check_size(size)
    bins, issame, where = _load(path)
    return list(_decoded(bins, where, size)), issame


def read_bin_tensors(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A verification .bin as ``(images uint8 (2P,3,H,W), issame bool (P,))``; see :func:`read_bin`.

    Images are decoded straight into one tensor. All must share one size unless ``size`` is given.
    With :func:`pair_indices`: ``evaluate_pairs(model, images, *pair_indices(len(issame)), issame)``.
    """
    _check_size(size)
    bins, issame, where = _load(path)
    images = None
    for i, img in enumerate(_decoded(bins, where, size)):
        if images is None:  # numpy: its strided copies are far cheaper than torch's for one small image
            images = np.empty((len(bins), 3, *img.shape[:2]), np.uint8)
        if img.shape[:2] != images.shape[2:]:
            raise DataError(f"{where}: image {i} is {img.shape[1]}x{img.shape[0]} but image 0 is "
                            f"{images.shape[3]}x{images.shape[2]}; pass size= to resize them all")
        images[i] = img.transpose(2, 0, 1)
    return torch.from_numpy(images), torch.tensor(issame, dtype=torch.bool)


def pair_indices(num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx_a, idx_b)`` LongTensors (P,) of a .bin's pairs: images 0, 2, 4, ... and 1, 3, 5, ..."""
    return torch.arange(0, 2 * num_pairs, 2), torch.arange(1, 2 * num_pairs, 2)


# ---------------------------------------------------------------------------------------------- writing


def _check_encoding(fmt: str, quality: int, protocol: int) -> None:
    check_encoding(fmt, quality)
    if not isinstance(protocol, int) or not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(f"protocol must be an int in 0..{pickle.HIGHEST_PROTOCOL}, got {protocol!r}")


def _check_image(img, i: int) -> np.ndarray:
    """Image ``i`` as a uint8 (H,W,3) numpy array (a view where possible): a (3,H,W) tensor or (H,W,3) array."""
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}] must be a uint8 (3,H,W) tensor, got {tuple(img.shape)} {img.dtype}")
        return img.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"images[{i}] must be a uint8 (H,W,3) numpy array, got {img.shape} {img.dtype}")
        return img
    raise ValueError(f"images[{i}] is a {type(img).__name__}; expected a uint8 (3,H,W) tensor or (H,W,3) array")


def _check_issame(issame) -> list[bool]:
    """``issame`` (a sequence of bools, or a bool tensor / array (P,)) as a list of P >= 1 bools."""
    if isinstance(issame, torch.Tensor):
        issame = issame.detach().cpu().numpy()
    if isinstance(issame, np.ndarray) and issame.ndim != 1:
        raise ValueError(f"issame must be 1-D (P,), got shape {issame.shape}")
    flags = list(issame)
    for i, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"issame[{i}] is {flag!r} ({type(flag).__name__}); expected a bool")
    if not flags:
        raise ValueError("issame is empty; a .bin needs at least one pair")
    return [bool(f) for f in flags]


def _dump(path: Path, encoded: list[bytes], flags: list[bool], protocol: int) -> None:
    """Pickle ``(encoded, flags)`` to ``path`` atomically (see askd.atomic); its folder must exist."""
    with replacing(path, make_parents=False) as tmp, open(tmp, "wb") as f:
        pickle.dump((encoded, flags), f, protocol=protocol)


def write_bin(
    path: str | Path,
    images: Sequence,
    issame,
    fmt: str = "png",
    quality: int = 95,
    protocol: int = PROTOCOL,
) -> None:
    """Write a verification .bin: ``images`` 2P uint8 images, images 2i and 2i+1 forming pair i with
    label ``issame[i]`` (P bools, or a bool tensor / array (P,)).

    An image is a (3,H,W) tensor or an (H,W,3) numpy array (so a (2P,3,H,W) tensor works as well);
    sizes may differ. ``fmt`` "png" is lossless (a round trip through :func:`read_bin` is bit-exact),
    "jpeg" uses ``quality``. The file is written atomically; ValueError for bad inputs, before writing.
    """
    _check_encoding(fmt, quality, protocol)
    flags = _check_issame(issame)
    arrays = [_check_image(img, i) for i, img in enumerate(images)]
    if len(arrays) != 2 * len(flags):
        raise ValueError(f"got {len(arrays)} images for {len(flags)} issame flags; expected {2 * len(flags)} "
                         "(images 2i, 2i+1 form pair i)")
    _dump(Path(path), [encode_image(a, fmt, quality) for a in arrays], flags, protocol)


def make_bin(
    root: str | Path,
    path: str | Path,
    num_pairs: int,
    seed: int = 0,
    size: int = 112,
    fmt: str = "png",
    quality: int = 95,
    protocol: int = PROTOCOL,
    identities: list[str] | None = None,
) -> dict:
    """Write a .bin of ``num_pairs`` pairs sampled from ``root/<identity>/<image>`` (or only its ``identities``).

    Images are read by ``ImageFolderFaces(root, size, identities)``; pairs come from
    :func:`askd.data.pairs.make_pairs` (genuine and impostor alternating, balanced, deterministic for ``seed``).
    Each image is encoded and stored once however many pairs use it (pickle shares repeated objects). Returns
    ``{"pairs", "same", "images" (distinct images used), "identities"}``.
    """
    _check_encoding(fmt, quality, protocol)  # before reading the folder
    faces = ImageFolderFaces(root, size, identities)
    idx_a, idx_b, issame = make_pairs([label for _, label in faces.samples], num_pairs, seed)
    order = torch.stack([idx_a, idx_b], 1).reshape(-1).tolist()  # a0, b0, a1, b1, ...
    encoded = {i: encode_image(faces[i][0].permute(1, 2, 0).numpy(), fmt, quality) for i in sorted(set(order))}
    _dump(Path(path), [encoded[i] for i in order], issame.tolist(), protocol)
    return {"pairs": num_pairs, "same": int(issame.sum()), "images": len(encoded), "identities": faces.num_classes}


# -------------------------------------------------------------------------------------------------- CLI


def _make(args: argparse.Namespace) -> None:
    s = make_bin(args.root, args.out, args.pairs, args.seed, args.size, args.format, args.quality)
    print(f"wrote {args.out}: {s['pairs']} pairs ({s['same']} same) of {s['images']} images "
          f"({args.size}x{args.size}) from {s['identities']} identities")


def _info(args: argparse.Namespace) -> None:
    bins, issame, where = _load(args.bin)
    sizes = {f"{a.shape[1]}x{a.shape[0]}" for a in _decoded(bins, where, None)}  # one image in memory at a time
    print(f"{args.bin}: {len(issame)} pairs ({sum(issame)} same, {len(issame) - sum(issame)} different), "
          f"{len(bins)} images of {', '.join(sorted(sizes))}")


def _parser() -> argparse.ArgumentParser:
    description = "Make or check InsightFace verification .bin files."
    ap = argparse.ArgumentParser(prog=f"python -m {PROG}", description=description)
    commands = ap.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="write a .bin of pairs sampled from ROOT/<identity>/<image>")
    make.add_argument("root", help="image folder ROOT/<identity>/<image>")
    make.add_argument("out", help="output .bin path")
    make.add_argument("--pairs", type=int, required=True, help="number of pairs (half genuine, half impostor)")
    make.add_argument("--seed", type=int, default=0, help="pair sampling seed")
    make.add_argument("--size", type=int, default=112, help="images are resized and cropped to SIZE x SIZE")
    make.add_argument("--format", choices=ENCODINGS, default="png", help="png: lossless; jpeg: smaller")
    make.add_argument("--quality", type=int, default=95, help="JPEG quality, 1..100")
    make.set_defaults(run=_make)
    info = commands.add_parser("info", help="read every image of a .bin and print what it holds")
    info.add_argument("bin", help="a verification .bin file")
    info.set_defaults(run=_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as err:  # DataError is a ValueError; OSError: missing or unwritable paths
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
