"""``python -m askd.data.pack SRC DST``: an image folder ``SRC/<identity>/<image>`` as an InsightFace RecordIO pack.

``DST`` receives ``train.rec``, ``train.idx`` and ``property`` (formats in askd.data.recordio and
askd.data.insightface): header record
0 whose label is the identity-record key range [N+1, N+K+1); image records 1..N in ``ImageFolderFaces(SRC)``
order (identities sorted, then images sorted), each labelled with its identity index 0..K-1 and resized to
``--size`` by the same rule; then identity records N+1..N+K, each holding its images' key range [start, end);
``property`` is ``K,size,size``. Images are JPEG (``--quality``, default 95) or, with ``--format png``,
lossless PNG, whose items read back equal to ``ImageFolderFaces(SRC, size)`` bit for bit.

``--holdout F --pairs P`` keeps the last fraction F of the identities (sorted order, as ``askd.train`` holds
out image folders) out of the pack and writes P verification pairs of them to ``DST/heldout.bin``, which
``askd.train --data DST`` then evaluates on.

Writing is atomic: the three files are written under temporary names in DST (askd.atomic), synced, and
renamed only when complete, so an interrupted run leaves no pack that looks valid (see _write_pack for the
order). Exit status 2 with one line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ..atomic import replacing
from .folders import ENCODINGS, DataError, ImageFolderFaces, check_encoding, encode_image, split_identities
from .recordio import RecordWriter, pack_header
from .verification_bin import make_bin

FILES = ("train.rec", "train.idx", "property")
MAX_KEY = 1 << 24  # header and identity records hold keys as float32 labels, exact only up to 2**24


def _identity_ranges(faces: ImageFolderFaces) -> list[range]:
    """Image-key range of each identity: samples are grouped by label, and image keys start at 1."""
    counts = [0] * faces.num_classes
    for _, label in faces.samples:
        counts[label] += 1
    ends = list(itertools.accumulate(counts, initial=1))
    return [range(start, end) for start, end in itertools.pairwise(ends)]


def _write_records(faces: ImageFolderFaces, rec: Path, idx: Path, fmt: str, quality: int) -> None:
    """Header record 0, the image records 1..N, then the identity records, to ``rec`` / ``idx``."""
    n, ranges = len(faces), _identity_ranges(faces)
    with RecordWriter(rec, idx) as writer:
        writer.write(0, pack_header((n + 1, n + 1 + len(ranges))))
        for key in tqdm(range(1, n + 1), desc="askd.data.pack", unit="img"):
            image, label = faces[key - 1]
            writer.write(key, pack_header(label, id=key) + encode_image(image.permute(1, 2, 0).numpy(), fmt, quality))
        for label, keys in enumerate(ranges):
            writer.write(n + 1 + label, pack_header((keys.start, keys.stop), id=n + 1 + label))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_pack(faces: ImageFolderFaces, dst: Path, fmt: str, quality: int, size: int) -> None:
    """Write ``dst``/{train.rec, train.idx, property}, each renamed over an older one only when all are complete.

    ``replacing`` renames as its block is left, innermost first: the rec, then the idx, then property. An
    older pack's idx and property go just before, so that no moment pairs the new .rec with an old .idx
    (wrong offsets) or an old property (wrong identity count); a stop in between leaves a pack without its
    .idx, which does not open, or the new rec and idx without property, which is complete.
    """
    rec, idx, prop = (dst / name for name in FILES)
    with replacing(prop) as prop_tmp, replacing(idx) as idx_tmp, replacing(rec) as rec_tmp:
        _write_records(faces, rec_tmp, idx_tmp, fmt, quality)
        prop_tmp.write_text(f"{faces.num_classes},{size},{size}\n", encoding="ascii")
        # the long sync of the .rec before the old pack goes: a stop during it leaves that pack whole
        _fsync(rec_tmp)
        prop.unlink(missing_ok=True)
        idx.unlink(missing_ok=True)


def pack_folder(
    src: str | Path,
    dst: str | Path,
    fmt: str = "jpeg",
    quality: int = 95,
    size: int = 112,
    identities: list[str] | None = None,
) -> dict:
    """Pack the image folder ``src`` (or only its ``identities``) into ``dst``/{train.rec, train.idx, property}.

    Returns a summary: ``dst``, ``images`` (N), ``identities`` (K), ``format``, ``bytes`` (size of train.rec).
    """
    check_encoding(fmt, quality)
    faces = ImageFolderFaces(src, size=size, identities=identities)
    if len(faces) + faces.num_classes + 1 > MAX_KEY:
        raise DataError(f"{src}: {len(faces)} images and {faces.num_classes} identities need record keys "
                        f"beyond {MAX_KEY}, which float32 labels cannot hold exactly")
    dst = Path(dst)
    _write_pack(faces, dst, fmt, quality, size)
    return {"dst": str(dst), "images": len(faces), "identities": faces.num_classes, "format": fmt,
            "bytes": (dst / FILES[0]).stat().st_size}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m askd.data.pack",
                                 description="Pack an image folder SRC/<identity>/<image> as an InsightFace "
                                             "RecordIO pack DST/{train.rec,train.idx,property}.")
    ap.add_argument("src", help="image folder SRC/<identity>/<image>")
    ap.add_argument("dst", help="output folder (created if missing; an older pack there is replaced)")
    ap.add_argument("--format", choices=ENCODINGS, default="jpeg", help="image encoding; png is lossless")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality 1..100 (default 95)")
    ap.add_argument("--size", type=int, default=112, help="side of the square images (default 112)")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="fraction of identities (the last in sorted order) kept out for DST/heldout.bin")
    ap.add_argument("--pairs", type=int, default=1200, help="verification pairs in heldout.bin (default 1200)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_ids = held = None
        if args.holdout:
            if not 0.0 < args.holdout < 1.0:
                raise DataError(f"--holdout must be a fraction in (0, 1), got {args.holdout}")
            train_ids, held = split_identities(args.src, args.holdout, "--holdout")
        info = pack_folder(args.src, args.dst, args.format, args.quality, args.size, train_ids)
        if held:
            out = Path(args.dst) / "heldout.bin"
            s = make_bin(args.src, out, args.pairs, size=args.size, identities=held)
            print(f"wrote {out}: {s['pairs']} pairs ({s['same']} same) of {s['identities']} held-out identities")
    except (OSError, ValueError) as e:  # a missing or empty folder, an unreadable image, a bad option (DataError too)
        print(f"askd.data.pack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("askd.data.pack: interrupted", file=sys.stderr)
        return 130
    print(f"packed {info['images']} images of {info['identities']} identities ({info['format']}, "
          f"{info['bytes']} bytes) into {info['dst']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
