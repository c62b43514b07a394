"""``python -m askd.eval``: evaluate trained checkpoints on the field's benchmarks.

    python -m askd.eval verify MODEL.pt [MODEL.pt ...] --bin lfw.bin agedb_30.bin [--protocol askd]
    python -m askd.eval tinyface MODEL.pt --root path/to/tinyface [--low-res-size 14]
    python -m askd.eval attention --teacher T.pt --student askd=S.pt [--student base=B.pt] --bin agedb_30.bin

Resolution: each model sees what it was trained on unless told otherwise. A teacher checkpoint gets the HR
images, a student the LR synthesis of its own training run (its variant, its LR size), applied to both images
of a pair as the paper does; ``--hr``, ``--low-res-size PX`` (also spelt ``--lr-size``) or ``--scale N`` (and
``--variant``) override that for every model. TinyFace images are natively low-resolution, so ``tinyface``
applies no synthesis unless ``--low-res-size``/``--scale`` is given. ``attention`` always gives the teacher HR
and the students LR.

Results print as markdown tables; ``--json FILE`` also writes them as JSON. ``attention`` writes
``attention.md`` (per-block Pearson r) and ``attention.png`` (spatial maps over the face) in ``--out``.
Bad input (a missing or corrupt file, a wrong layout) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, describe_role, load_model, require_face
from ..config import ConfigError
from ..data import degrade
from ..data.folders import DataError, ImageFolderFaces
from ..data.verification_bin import pair_indices, read_bin_tensors
from ..devices import resolve_device
from .attention import attention_correlation
from .embed import to_model_input
from .figures import attention_figure, spatial_maps, stage_last_blocks
from .identification import evaluate_tinyface
from .report import correlation_table, markdown_table
from .verification import PROTOCOLS, evaluate_pairs

PROG = "askd.eval"


@dataclass
class Loaded:
    """A checkpoint's model and the input it is evaluated on: ``low_res_size`` None means HR."""

    name: str
    model: torch.nn.Module
    role: str
    variant: str
    low_res_size: int | None

    def transform(self):
        """The LR synthesis on a float batch in [-1,1], or None for HR."""
        if self.low_res_size is None:
            return None
        side, variant = self.low_res_size, self.variant
        return lambda x: degrade(x, side, variant)

    def label(self) -> str:
        res = "HR" if self.low_res_size is None else f"LR {self.low_res_size} px"
        return f"{self.name} ({self.role}, {res})"


def low_res_override(args) -> int | None | str:
    """The LR size the flags ask for: an int, None for ``--hr``, or "auto" (each checkpoint's own)."""
    if args.hr:
        return None
    if args.low_res_size:
        return args.low_res_size
    if args.scale:
        return 112 // args.scale
    return "auto"


def load(path: str, args, device: torch.device, name: str | None = None, low_res="auto") -> Loaded:
    """A checkpoint as a :class:`Loaded`; ``low_res`` "auto" takes HR for a teacher or HORKD assistant, the run's
    LR size otherwise."""
    model, ckpt = load_model(path, device)
    require_face(ckpt, path, "askd.eval")
    role = describe_role(ckpt)
    if low_res == "auto":
        hr = ckpt.get("role") in ("teacher", "assistant")
        low_res = None if hr else run_low_res_size(ckpt.get("config", {}))
    variant = args.variant or ckpt["variant"]
    return Loaded(name or Path(path).parent.name or Path(path).stem, model, role, variant, low_res)


def run_low_res_size(cfg: dict) -> int:
    """The LR side of the training run whose config (a checkpoint's ``config`` dict) is ``cfg``."""
    # checkpoints of older versions name the key lr_size
    return cfg.get("low_res_size", cfg.get("lr_size")) or 112 // cfg.get("scale", 8)


def cmd_verify(args, device: torch.device) -> dict:
    sets = {Path(p).stem: read_bin_tensors(p, size=112) for p in args.bin}
    results = {}
    for path in args.models:
        m = load(path, args, device, low_res=low_res_override(args))
        row = {}
        for name, (images, issame) in sets.items():
            r = evaluate_pairs(m.model, images, *pair_indices(len(issame)), issame, args.protocol, m.transform(),
                               args.batch_size, device)
            row[name] = {"accuracy": r["accuracy"], "std": r["std"]}
        results[m.label()] = row
    lines = [f"Verification ({args.protocol} protocol, 10 folds, flip TTA), accuracy % (std over folds)", ""]
    lines += markdown_table(["model", *sets], [[label] + [f"{100 * r['accuracy']:.2f} ({100 * r['std']:.2f})"
                                                          for r in row.values()] for label, row in results.items()])
    print("\n".join(lines))
    return {"protocol": args.protocol, "verification": results}


def cmd_tinyface(args, device: torch.device) -> dict:
    low_res = low_res_override(args)
    results = {}
    for path in args.models:
        m = load(path, args, device, low_res=None if low_res == "auto" else low_res)
        results[m.label()] = evaluate_tinyface(m.model, args.root, args.batch_size, device, m.transform(),
                                               flip=not args.no_flip, num_workers=args.workers)
    ranks = [k for k in next(iter(results.values())) if k.startswith("rank-")]
    keys = [*ranks, "mAP"]
    rows = [[label] + [f"{100 * r[k]:.2f}" for k in keys] for label, r in results.items()]
    print("\n".join(["TinyFace identification (%)", "", *markdown_table(["model", *keys], rows)]))
    return {"tinyface": results}


def attention_images(args) -> torch.Tensor:
    """uint8 (N,3,112,112): the images of ``--bin`` or of the folder ``--folder``, the first ``--max-images``."""
    if args.bin:
        images = read_bin_tensors(args.bin, size=112)[0]
    else:
        faces = ImageFolderFaces(args.folder)
        images = torch.stack([faces[i][0] for i in range(min(len(faces), args.max_images))])
    return images[: args.max_images]


def cmd_attention(args, device: torch.device) -> dict:
    low_res = low_res_override(args)
    teacher = load(args.teacher, args, device, "teacher", low_res=None)
    students = []
    for spec in args.student:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).parent.name, spec
        students.append(load(path, args, device, name, low_res=low_res))
    if any(s.low_res_size is None for s in students):
        raise DataError("attention compares the teacher on HR with students on LR; drop --hr")
    images = attention_images(args)
    correlations = {s.name: attention_correlation(teacher.model, s.model, images, s.transform(),
                                                  args.batch_size, device) for s in students}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = correlation_table(correlations)
    source = args.bin or args.folder
    side = students[0].low_res_size
    (out / "attention.md").write_text(f"{len(images)} images of {source}; students on LR {side} px\n\n{table}\n")
    figure = figure_of(teacher, students, images[: args.figure_images], device, out / "attention.png")
    print(table)
    print(f"wrote {out / 'attention.md'} and {figure}")
    return {"attention_correlation": correlations, "images": len(images)}


def figure_of(teacher: Loaded, students: list[Loaded], images: torch.Tensor, device, path: Path) -> Path:
    """The maps figure: per image, the teacher's spatial maps on HR and each student's on LR, last block per stage."""
    x = to_model_input(images.to(device))
    with torch.inference_mode():
        blocks = stage_last_blocks(teacher.model(x[:1])[1])
        views = [(teacher, x)] + [(s, s.transform()(x)) for s in students]
        maps = [spatial_maps(m.model, v, blocks) for m, v in views]
    faces, rows = [], []
    for i in range(len(images)):
        for (m, v), mp in zip(views, maps, strict=True):
            faces.append(v[i])
            rows.append((f"{i + 1}: {m.name}\n{'HR' if m.low_res_size is None else f'LR {m.low_res_size} px'}",
                         len(faces) - 1, mp[i]))
    return attention_figure(path, faces, rows, [f"block {b + 1}" for b in blocks])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="pair verification on InsightFace .bin files")
    verify.add_argument("models", nargs="+", help="askd checkpoints (teacher or student)")
    verify.add_argument("--bin", nargs="+", required=True, help="verification .bin files (lfw.bin, agedb_30.bin, ...)")
    verify.add_argument("--protocol", choices=PROTOCOLS, default="insightface")
    tiny = sub.add_parser("tinyface", help="TinyFace rank-k and mAP with distractors")
    tiny.add_argument("models", nargs="+", help="askd checkpoints")
    tiny.add_argument("--root", required=True, help="the tinyface folder (or its Testing_Set)")
    tiny.add_argument("--no-flip", action="store_true", help="embed without flip TTA")
    tiny.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    att = sub.add_parser("attention", help="teacher (HR) vs student (LR) attention: Pearson r table and map figure")
    att.add_argument("--teacher", required=True, help="teacher checkpoint")
    att.add_argument("--student", action="append", required=True, help="NAME=CHECKPOINT (repeatable)")
    src = att.add_mutually_exclusive_group(required=True)
    src.add_argument("--bin", help="take the images of a verification .bin")
    src.add_argument("--folder", help="take the images of a folder root/<identity>/<image>")
    att.add_argument("--max-images", type=int, default=2000, help="images for the correlations")
    att.add_argument("--figure-images", type=int, default=3, help="images in the figure")
    att.add_argument("--out", default="attention", help="folder for attention.md and attention.png")
    for s in (verify, tiny, att):
        res = s.add_mutually_exclusive_group()
        res.add_argument("--hr", action="store_true", help="evaluate every model on HR images")
        res.add_argument("--low-res-size", "--lr-size", type=int,
                         help="LR synthesis to this side in px for every model")
        res.add_argument("--scale", type=int, choices=(2, 4, 8), help="LR side = 112 / scale for every model")
        s.add_argument("--variant", choices=("official", "paper"), help="LR synthesis variant (default: the model's)")
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        s.add_argument("--json", help="also write the results to this JSON file")
    return p


COMMANDS = {"verify": cmd_verify, "tinyface": cmd_tinyface, "attention": cmd_attention}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        results = COMMANDS[args.command](args, resolve_device(args.device))
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, NotADirectoryError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
