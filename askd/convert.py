"""``python -m askd.convert``: checkpoints of the authors' code to askd checkpoints and back.

    python -m askd.convert official NET.ckpt [--margin MARGIN.ckpt] --out OUT.pt [--low-res-size PX]
    python -m askd.convert to-official ASKD.pt --out NET.ckpt [--margin-out MARGIN.ckpt]

The authors' code is gist-ailab/teaching-where-to-look (Shin et al., ECCV 2022): ``model/backbone.py``
``CBAMResNet(50)`` (``ir50_cbam``; ``CBAMResNet(100)`` is ``ir100_cbam``, ``--arch``) and ``model/margin.py``
``ArcMarginProduct``. Its training scripts save each as its own file, ``torch.save({'iters': n,
'net_state_dict': state_dict})``: ``*_net.ckpt`` (the backbone) and ``*_margin.ckpt`` (the margin, the same
layout). They save ``model.module.state_dict()`` under DataParallel, so their files carry no ``module.``
prefix; a state dict saved from the wrapper itself does, and is taken too (all keys prefixed, or none).

``official`` writes an askd checkpoint (arch ``ir50_cbam``, variant ``official``: their 3x3 spatial conv and
pre-sigmoid maps) that ``askd.eval``, ``askd.export`` and, with ``--margin``, ``askd.train --teacher`` read.
It is a teacher (HR) unless ``--low-res-size PX`` says it is a student of PX-px faces (their ``--down_size``),
which askd.eval then evaluates on the official LR synthesis of that size. ``to-official`` is the reverse: an
askd ``ir50_cbam``/``official`` checkpoint as the pair of files their ``test.py`` and ``train_student.py`` load.

Key mapping, theirs -> ours (k = j + the blocks of the stages before s, stage sizes 3, 4, 14, 3 for IR-50):

    | authors' CBAMResNet                                | askd IResNetCBAM                 | layer                    |
    |----------------------------------------------------|----------------------------------|--------------------------|
    | input_layer.0.weight                               | stem.0.weight                    | conv3x3 3->64            |
    | input_layer.1.*                                    | stem.1.*                         | BN2d                     |
    | input_layer.2.weight                               | stem.2.weight                    | PReLU                    |
    | layer{s}.{j}.res_layer.{0..5}.*                    | blocks.{k}.res.{0..5}.*          | BN conv BN PReLU conv BN |
    | layer{s}.{j}.channel_layer.shared_mlp.{0,2}.weight | blocks.{k}.cbam.mlp.{0,2}.weight | channel MLP              |
    | layer{s}.{j}.spatial_layer.conv.weight             | blocks.{k}.cbam.spatial.weight   | conv3x3 2->1             |
    | layer{s}.0.shortcut_layer.{0,1}.*                  | blocks.{k}.shortcut.{0,1}.*      | conv1x1/2, BN            |
    | output_layer.0.*                                   | head.0.*                         | BN2d                     |
    | output_layer.3.{weight,bias}                       | head.3.{weight,bias}             | Linear 25088->E          |
    | output_layer.4.*                                   | head.4.*                         | BN1d                     |
    | margin file: weight (N,E)                          | checkpoint['head']: weight (N,E) | ArcFace                  |

BN ``*`` is weight, bias, running_mean, running_var, num_batches_tracked. Same modules in the same order with
the same shapes: both key lists are in forward order, so the mapping keeps the order. What was checked and
holds exactly: BN on both sides with PyTorch's defaults (eps 1e-5, momentum 0.1; neither stores them); their
``Flatten`` (``input.view(input.size(0), -1)``) and ``nn.Flatten`` both flatten (C,H,W) in that order; askd's
``PointwiseConv`` is an ``nn.Conv2d(in, out, 1, stride, bias=False)`` with the same ``weight``; the channel
MLP's hidden width is C // 16 in both (askd's ``max(C // 16, 1)`` differs only below 16 channels); the spatial
conv pools (mean, max) over channels in that order, padding 1, no bias; Dropout (0.4) and the attention hooks
(``target``) hold no state. ArcMarginProduct's ``weight`` (out_feature, in_feature) is askd ArcFace's
``weight`` (num_classes, embedding_size); s = 32, m = 0.5 are in neither file (askd takes ``arcface_s``/
``arcface_m`` from its config).

One difference that is not in the layers: the colour order. Their loaders read images with ``cv2.imread``
(``dataset/casia_webface.py`` and ``dataset/agedb.py``, ``img_loader``; ``load_images_from_bin.py`` writes the
evaluation images back with ``cv2.cvtColor(img, cv2.COLOR_RGB2BGR)`` + ``cv2.imwrite``), and ``ToTensor`` keeps
that order, so their networks see BGR; askd feeds RGB. The first layer is the stem conv and both sides
normalise every channel alike (``(x / 255 - 0.5) / 0.5`` and ``x / 127.5 - 1``), so reversing the stem conv's
input channels (``weight.flip(1)``) makes the askd model on RGB compute exactly what theirs does on BGR. That is
the default (``--input-order bgr``), both ways; ``--input-order rgb`` copies the stem conv unchanged, for a
network trained on RGB. Every other tensor is copied as it is.

Refused, with a message naming the first key that does not fit (unexpected, wrong shape, then missing) and
exit status 2, nothing written: any other layout (another depth, a missing ``num_batches_tracked``, a 7x7
spatial conv), a ``paper`` variant or an arch without a CBAMResNet counterpart for ``to-official``, a margin
whose width is not the embedding's, an unreadable file. The authors' files are read with
``torch.load(weights_only=True)``: they hold only an int and tensors, and a foreign pickle runs no code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, models
from .archs import ARCHS
from .atomic import replacing
from .checkpoint import CheckpointError

PROG = "askd.convert"
SOURCE = "gist-ailab/teaching-where-to-look"
DEPTHS = {"ir50_cbam": 50, "ir100_cbam": 100}  # askd arch -> the CBAMResNet(num_layers) of the same layers
VARIANT = "official"  # their CBAM: 3x3 spatial conv, pre-sigmoid maps
PREFIX = "module."  # DataParallel's
INPUT_ORDERS = ("bgr", "rgb")
STEM_CONV = "stem.0.weight"  # the one layer that sees the colour channels
EMBEDDING_BN = "output_layer.4.weight"  # (E,): the embedding size of their file
DEFAULT_EMBEDDING = 512  # CBAMResNet's feature_dim
# askd prefix -> theirs: outside the residual blocks, then inside one block
TOP = (("stem.", "input_layer."), ("head.", "output_layer."))
BLOCK = (
    ("res.", "res_layer."),
    ("cbam.mlp.", "channel_layer.shared_mlp."),
    ("cbam.spatial.", "spatial_layer.conv."),
    ("shortcut.", "shortcut_layer."),
)


class ConvertError(RuntimeError):
    """A file that is not what the conversion needs: unreadable, of another layout, or of another model."""


def official_key(key: str, blocks: tuple[int, ...]) -> str:
    """askd's name of a state entry -> the authors' (``blocks.7.cbam.mlp.0.weight`` -> ``layer3.0.channel_layer
    .shared_mlp.0.weight`` for IR-50)."""
    for ours, theirs in TOP:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    parts = key.split(".", 2)  # blocks.{k}.rest
    for ours, theirs in BLOCK:
        if len(parts) == 3 and parts[0] == "blocks" and parts[2].startswith(ours):
            stage, j = locate(int(parts[1]), blocks)
            return f"layer{stage}.{j}.{theirs}{parts[2][len(ours) :]}"
    # an askd layer the authors' network lacks: refuse rather than drop or invent weights
    raise ConvertError(f"askd's {key} has no counterpart in the authors' CBAMResNet")


def locate(k: int, blocks: tuple[int, ...]) -> tuple[int, int]:
    """Block ``k`` of the flat list -> (stage 1..4, index j in the stage)."""
    for stage, n in enumerate(blocks, 1):
        if k < n:
            return stage, k
        k -= n
    raise ConvertError(f"block {k} is beyond the {sum(blocks)} blocks of {blocks}")


def askd_layout(arch: str, embedding_size: int) -> OrderedDict[str, torch.Size]:
    """askd's state entries of ``arch`` (variant official) and their shapes, in order; built on the meta device,
    so nothing is allocated."""
    with torch.device("meta"):
        model = models.create(arch, VARIANT, embedding_size, backend="torch")
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


def key_map(arch: str, embedding_size: int) -> OrderedDict[str, tuple[str, torch.Size]]:
    """Their key -> (our key, shape), in forward order."""
    blocks = ARCHS[arch][0]
    return OrderedDict((official_key(k, blocks), (k, s)) for k, s in askd_layout(arch, embedding_size).items())


def check_state(state: Any, expected: Mapping[str, torch.Size], what: str) -> None:
    """ConvertError naming the first entry of ``state`` that does not fit ``expected`` (name -> shape): unexpected
    or of the wrong shape, in the file's order, then the first missing one in ``expected``'s order."""
    if not isinstance(state, Mapping):
        raise ConvertError(f"{what}: expected a state dict, got {type(state).__name__}")
    for key, value in state.items():
        if key not in expected:
            raise ConvertError(f"{what}: unexpected key {key!r} ({len(state)} entries, {len(expected)} expected)")
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != expected[key]:
            raise ConvertError(f"{what}: {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key])}")
    missing = next((k for k in expected if k not in state), None)
    if missing is not None:
        raise ConvertError(f"{what}: missing key {missing!r}")


def strip_prefix(state: Any) -> Any:
    """``state`` without DataParallel's ``module.`` when every key has it; else as it is (check_state then
    refuses a mixed dict at its first prefixed key)."""
    if isinstance(state, Mapping) and state and all(isinstance(k, str) and k.startswith(PREFIX) for k in state):
        return OrderedDict((k[len(PREFIX) :], v) for k, v in state.items())
    return state


def check_input_order(input_order: str) -> None:
    if input_order not in INPUT_ORDERS:
        raise ConvertError(f"input order must be one of {INPUT_ORDERS}, got {input_order!r}")


def recolour(key: str, value: torch.Tensor, input_order: str) -> torch.Tensor:
    """The stem conv with its input channels reversed for a BGR-trained network (see the module docstring);
    flip is its own inverse, so both directions use it."""
    return value.flip(1) if key == STEM_CONV and input_order == "bgr" else value


def embedding_size_of(net: Any) -> int:
    """E of their state dict: the width of its embedding BN (CBAMResNet's feature_dim), 512 if that is absent
    (check_state then names what is wrong)."""
    value = net.get(EMBEDDING_BN) if isinstance(net, Mapping) else None
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() == 1 else DEFAULT_EMBEDDING


def check_margin(margin: Any, embedding_size: int, what: str) -> int:
    """A margin's (or head's) state dict is one ``weight`` (N, E); returns N."""
    weight = margin.get("weight") if isinstance(margin, Mapping) else None
    n = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 1
    check_state(margin, {"weight": torch.Size((n, embedding_size))}, what)
    if n < 1:
        raise ConvertError(f"{what}: 'weight' has no classes")
    return n


def from_official(
    net: Any, margin: Any = None, arch: str = "ir50_cbam", input_order: str = "bgr"
) -> tuple[OrderedDict[str, torch.Tensor], OrderedDict[str, torch.Tensor] | None]:
    """Their backbone (and margin) state dicts, ``module.`` or not -> askd's model (and head) state dicts, in
    askd's order; ConvertError naming the first key that does not fit."""
    check_arch(arch)
    check_input_order(input_order)
    net = strip_prefix(net)
    embedding = embedding_size_of(net)
    mapping = key_map(arch, embedding)
    check_state(net, {theirs: shape for theirs, (_, shape) in mapping.items()}, f"CBAMResNet({DEPTHS[arch]})")
    model = OrderedDict((ours, recolour(ours, net[theirs], input_order)) for theirs, (ours, _) in mapping.items())
    head = None
    if margin is not None:
        margin = strip_prefix(margin)
        check_margin(margin, embedding, "ArcMarginProduct")
        head = OrderedDict(weight=margin["weight"])
    return model, head


def to_official(
    model: Any, head: Any = None, arch: str = "ir50_cbam", input_order: str = "bgr", embedding_size: int = 512
) -> tuple[OrderedDict[str, torch.Tensor], OrderedDict[str, torch.Tensor] | None]:
    """askd's model (and head) state dicts -> the authors' backbone (and margin) state dicts, in their order."""
    check_arch(arch)
    check_input_order(input_order)
    layout = askd_layout(arch, embedding_size)
    check_state(model, layout, f"askd {arch}/{VARIANT}")
    blocks = ARCHS[arch][0]
    net = OrderedDict((official_key(k, blocks), recolour(k, model[k], input_order)) for k in layout)
    margin = None
    if head is not None:
        check_margin(head, embedding_size, "askd ArcFace head")
        margin = OrderedDict(weight=head["weight"])
    return net, margin


def check_arch(arch: str) -> None:
    if arch not in DEPTHS:
        raise ConvertError(
            f"arch {arch!r} has no counterpart in the authors' code (CBAMResNet is built for 50, 100 or 152 "
            f"layers with 64..512 channels and CBAM reduction 16); convertible: {', '.join(DEPTHS)}"
        )


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line, cut short: torch's load errors span many lines."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def read_official(path: str | Path, what: str) -> tuple[Any, int | None]:
    """``(net_state_dict, iters)`` of one of their files (backbone or margin)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt, truncated or foreign file
        raise ConvertError(f"cannot read {what} {path}: {one_line(e)}") from None
    if isinstance(obj, Mapping) and "model" in obj and "arch" in obj:
        raise ConvertError(f"{path} is an askd checkpoint, not one of the authors' code; see 'to-official'")
    if not isinstance(obj, Mapping) or "net_state_dict" not in obj:
        raise ConvertError(f"{path} is not a checkpoint of the authors' code: no 'net_state_dict' entry")
    iters = obj.get("iters")
    return obj["net_state_dict"], iters if isinstance(iters, int) else None


def askd_checkpoint(model, head, arch: str, iters: int | None, low_res_size: int | None, source: dict) -> dict:
    """The checkpoint dict askd.checkpoint.load_model (and with a head, askd.train's load_frozen) reads."""
    embedding = model["head.4.weight"].shape[0]
    role = "teacher" if low_res_size is None else "student"
    config = {"arch": arch, "variant": VARIANT, "embedding_size": embedding}
    if low_res_size is not None:
        config["low_res_size"] = low_res_size  # what askd.eval degrades a student's input to
    ckpt = {
        "model": model, "arch": arch, "variant": VARIANT, "embedding_size": embedding, "role": role,
        # a student's method is unknown here (their train_student.py is A-SKD, but any net file looks alike)
        "method": "base" if role == "teacher" else "converted", "config": config, "step": iters or 0,
        "source": source,
    }
    if head is not None:
        ckpt.update(head=head, num_classes=head["weight"].shape[0])
    return ckpt


def convert_official(
    net_path: str | Path, out: str | Path, margin_path: str | Path | None = None, arch: str = "ir50_cbam",
    input_order: str = "bgr", low_res_size: int | None = None,
) -> dict:
    """Their NET.ckpt (and MARGIN.ckpt) -> askd checkpoint ``out``; every check runs before anything is written.
    Returns the checkpoint dict."""
    if low_res_size is not None and not 1 <= low_res_size <= 112:
        raise ConvertError(f"--low-res-size must be in 1..112 px, got {low_res_size}")
    refuse_overwrite(out, [net_path, margin_path])
    net, iters = read_official(net_path, "network checkpoint")
    margin = read_official(margin_path, "margin checkpoint")[0] if margin_path else None
    model, head = from_official(net, margin, arch, input_order)
    source = {"code": SOURCE, "net": str(net_path), "margin": margin_path and str(margin_path), "iters": iters,
              "input_order": input_order}
    ckpt = askd_checkpoint(model, head, arch, iters, low_res_size, source)
    write(ckpt, out)
    return ckpt


def convert_to_official(
    askd_path: str | Path, out: str | Path, margin_out: str | Path | None = None, input_order: str = "bgr"
) -> tuple[dict, dict | None]:
    """askd checkpoint -> their NET.ckpt (and MARGIN.ckpt); returns the dicts written."""
    refuse_overwrite(out, [askd_path])
    if margin_out is not None:
        refuse_overwrite(margin_out, [askd_path, out])
    try:
        ckpt = checkpoint.load(askd_path)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    arch, variant = ckpt["arch"], ckpt.get("variant")
    if variant != VARIANT:
        raise ConvertError(
            f"{askd_path} is variant {variant!r}: the authors' CBAM is the 'official' one (3x3 spatial conv, "
            f"model/backbone.py SAModule), a {variant} model's spatial conv does not fit it"
        )
    if margin_out is not None and "head" not in ckpt:
        raise ConvertError(f"{askd_path} holds no ArcFace head to write as {margin_out}")
    head = ckpt.get("head") if margin_out is not None else None
    net, margin = to_official(ckpt["model"], head, arch, input_order, int(ckpt.get("embedding_size", 512)))
    iters = int(ckpt.get("step") or 0)
    files = {"iters": iters, "net_state_dict": net}
    margin_file = None if margin is None else {"iters": iters, "net_state_dict": margin}
    # nested: neither file is put in place unless both were written
    margin_block = replacing(margin_out) if margin_out is not None else contextlib.nullcontext()
    with replacing(out) as tmp, margin_block as margin_tmp:
        torch.save(files, tmp)
        if margin_tmp is not None:
            torch.save(margin_file, margin_tmp)
    return files, margin_file


def refuse_overwrite(out: str | Path, inputs: list) -> None:
    """An output that is one of the inputs would destroy it (the rename replaces it)."""
    target = Path(out).resolve()
    for p in inputs:
        if p is not None and Path(p).resolve() == target:
            raise ConvertError(f"refusing to overwrite the input {p} with the output")
    if Path(out).is_dir():
        raise ConvertError(f"cannot write {out}: it is a directory")


def write(obj: Any, path: str | Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    off = sub.add_parser("official", help="the authors' NET.ckpt (+ MARGIN.ckpt) -> an askd checkpoint")
    off.add_argument("net", help="their *_net.ckpt: {'iters', 'net_state_dict'} of CBAMResNet")
    off.add_argument("--margin", help="their *_margin.ckpt (ArcMarginProduct): needed for askd.train --teacher")
    off.add_argument("--out", required=True, help="the askd checkpoint to write")
    off.add_argument("--arch", choices=sorted(DEPTHS), default="ir50_cbam", help="ir50_cbam = CBAMResNet(50)")
    off.add_argument("--low-res-size", type=int, metavar="PX",
                     help="the network is a student trained on PX-px faces (their --down_size); default: a teacher")
    back = sub.add_parser("to-official", help="an askd checkpoint -> NET.ckpt (+ MARGIN.ckpt) for the authors' code")
    back.add_argument("checkpoint", help="an askd checkpoint of ir50_cbam (or ir100_cbam), variant official")
    back.add_argument("--out", required=True, help="the *_net.ckpt to write")
    back.add_argument("--margin-out", help="also write the ArcFace head as their *_margin.ckpt")
    for s in (off, back):
        s.add_argument("--input-order", choices=INPUT_ORDERS, default="bgr",
                       help="colour order the authors' network sees: bgr (their cv2 loaders, default) or rgb")
    return p


def run(args) -> str:
    """The command; returns the line to print."""
    if args.command == "official":
        ckpt = convert_official(args.net, args.out, args.margin, args.arch, args.input_order, args.low_res_size)
        head = f", head of {ckpt['num_classes']} classes" if "head" in ckpt else ""
        line = (f"{PROG}: {args.net} (CBAMResNet({DEPTHS[args.arch]}), iters {ckpt['step']}) -> {args.out} "
                f"({args.arch}/{VARIANT} {ckpt['role']}{head}, input {args.input_order.upper()} -> RGB)")
        if "head" not in ckpt:
            line += "\n  no --margin: askd.eval and askd.export take it, askd.train --teacher needs the head"
        return line
    net, margin = convert_to_official(args.checkpoint, args.out, args.margin_out, args.input_order)
    also = f" and {args.margin_out} ({margin['net_state_dict']['weight'].shape[0]} classes)" if margin else ""
    return (f"{PROG}: {args.checkpoint} -> {args.out} ({len(net['net_state_dict'])} entries, iters "
            f"{net['iters']}){also}, for input {args.input_order.upper()}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(run(args))
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that cannot be made or written
        print(f"{PROG}: error: cannot write: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
