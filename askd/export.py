"""``python -m askd.export CHECKPOINT OUT.onnx``: a trained teacher or student as an ONNX face-embedding model.

The graph has one input ``image``, float32 (B,3,112,112) in [-1,1] (RGB, ``uint8 / 127.5 - 1``, as in
training), and one output ``embedding``, float32 (B,E) with E the checkpoint's ``embedding_size`` (512 by
default), un-normalised: L2-normalise it before comparing faces, as askd.eval does. A student expects its
low-resolution face already up-sampled back to 112x112 (what ``askd.data.degrade`` feeds it in training).
The CBAM attention maps that ``forward`` also returns are dropped: they only serve distillation and
analysis. Flip-TTA (askd.eval) is not part of the graph; run the model on the mirrored image too if wanted.

The batch axis is dynamic (named ``batch``) unless ``--static-batch B`` fixes it. The model is built with
CBAM backend ``torch``, the plain PyTorch modules: the fused ops (Triton, ``askd._C``) have no ONNX
translation. The file is written atomically (temp file beside it, fsync, rename) and only after the check:
onnxruntime (CPU) runs random inputs, including a batch size other than the export's example, and its
embeddings must match PyTorch's within ``atol * max(1, max|embedding|)``.

onnx, onnxscript (export) and onnxruntime (check) are optional dependencies, imported only here.
Exit status 2 with one line on stderr for a bad checkpoint, an unwritable output, a missing optional
package or a failed check; nothing is written then.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .atomic import replacing
from .checkpoint import CheckpointError, describe_role

INPUT, OUTPUT = "image", "embedding"
SIDE = 112  # the input side every askd model is built for
# The torch.export-based exporter emits opset 18 and newer; asked for less, it keeps 18 with a warning.
MIN_OPSET = 18
# Measured max |onnxruntime - PyTorch| of float32 embeddings (onnxruntime 1.32, 2-core EPYC): 5e-7 for
# ir_tiny_cbam (fresh, and the trained demo student, max |embedding| 2.0) and 4.9e-6 for ir50_cbam with
# perturbed BN statistics (max |embedding| 1.8); 1e-4 leaves a wide margin (37x there) for
# other CPUs' kernels and deeper nets.
ATOL = 1e-4
CHECK_BATCHES = (1, 3)  # both differ from the dynamic export's example batch, EXAMPLE_BATCH
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so a dynamic axis needs another example
PIP_HINT = "pip install onnx onnxscript onnxruntime"


class ExportError(RuntimeError):
    """An export that cannot be written, lacks its optional packages, or whose check failed."""


class EmbeddingOnly(nn.Module):
    """``model`` with its attention maps dropped: image (B,3,112,112) -> embedding (B,E)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)[0]


def require(name: str) -> ModuleType:
    """Import optional package ``name`` or raise ExportError saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the optional package {name!r} ({e}); {PIP_HINT}") from None


def load_model(path: str | Path) -> tuple[EmbeddingOnly, dict[str, Any]]:
    """The checkpoint's model (backend torch: the plain modules, which the exporter knows) in eval mode without
    grad, wrapped to return the embedding only, and the checkpoint."""
    model, ckpt = checkpoint.load_model(path, backend="torch")
    checkpoint.require_face(ckpt, path, "askd.export")
    return EmbeddingOnly(model).eval(), ckpt


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's noise the caller cannot act on: torch 2.13's own pytree deprecation warning and
    the registry's "torchvision is not installed" lines (askd uses no torchvision ops)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def write_onnx(model: EmbeddingOnly, path: Path, opset: int | None, batch: int | None) -> None:
    """Export ``model`` to ``path`` as one self-contained file; ``batch`` None makes the batch axis dynamic.

    The torch.export-based exporter (``dynamo=True``, the default since torch 2.9) rather than the legacy
    TorchScript one: the legacy exporter is deprecated and slated for removal, and the new one takes the
    dynamic batch as a checked ``torch.export.Dim`` instead of trusting a trace. Weights stay inside the
    file (``external_data=False``): even ir100_cbam is far below protobuf's 2 GB limit, and one file can be
    renamed atomically.
    """
    example = torch.rand(batch or EXAMPLE_BATCH, 3, SIDE, SIDE) * 2 - 1
    dynamic = None if batch else {INPUT: {0: torch.export.Dim("batch")}}
    with quiet_exporter():
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
            dynamo=True, external_data=False, dynamic_shapes=dynamic, verbose=False,
        )


def describe(path: Path) -> dict[str, Any]:
    """Opset, and name, dtype and shape (int or the symbolic name) of the graph's inputs and outputs."""
    onnx = require("onnx")
    graph_model = onnx.load(str(path))
    onnx.checker.check_model(graph_model)

    def io(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": dims}

    opset = next(o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "opset": opset,
        "inputs": [io(v) for v in graph_model.graph.input],
        "outputs": [io(v) for v in graph_model.graph.output],
    }


def check_against_torch(path: Path, model: EmbeddingOnly, batches: tuple[int, ...], atol: float) -> dict[str, float]:
    """Run onnxruntime (CPU) and ``model`` on seeded uniform [-1,1] images (b,3,112,112) for each b in
    ``batches``; ExportError if max|diff| exceeds ``atol * max(1, max|embedding|)``. Returns the numbers."""
    ort = require("onnxruntime")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (e.g. an opset it does not know)
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported model: {e}") from None
    gen = torch.Generator().manual_seed(0)
    diff = scale = 0.0
    for b in batches:
        x = torch.rand(b, 3, SIDE, SIDE, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
        if got.shape != ref.shape:
            raise ExportError(f"onnxruntime returned {tuple(got.shape)} for batch {b}, PyTorch {tuple(ref.shape)}")
        diff = max(diff, (got - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    tolerance = atol * max(1.0, scale)
    if not diff <= tolerance:  # written so that a NaN diff fails too
        raise ExportError(
            f"onnxruntime and PyTorch embeddings differ by up to {diff:.3g} (max |embedding| {scale:.3g}), "
            f"over the tolerance {tolerance:.3g}; the exported model is not written"
        )
    return {"max_abs_diff": diff, "embedding_scale": scale, "tolerance": tolerance}


def export_onnx(
    checkpoint_path: str | Path,
    out_path: str | Path,
    opset: int | None = None,
    batch: int | None = None,
    check: bool = True,
    atol: float = ATOL,
) -> dict[str, Any]:
    """Export an askd checkpoint to ``out_path``; returns the summary (see :func:`format_summary`).

    ``opset``: ONNX opset (>= 18; None: the exporter's default). ``batch``: a fixed batch size, None for a
    dynamic one. ``check``: compare onnxruntime with PyTorch before the file is put in place.
    """
    checkpoint_path, out = Path(checkpoint_path), Path(out_path)
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the torch.export-based exporter writes opset >= {MIN_OPSET}")
    if batch is not None and batch < 1:
        raise ExportError(f"a static batch must be >= 1, got {batch}")
    model, ckpt = load_model(checkpoint_path)
    if out.resolve() == checkpoint_path.resolve():
        raise ExportError(f"refusing to overwrite the checkpoint {checkpoint_path} with the ONNX model")
    for name in ("onnx", "onnxscript", *(("onnxruntime",) if check else ())):
        require(name)  # before the export, which takes seconds
    if out.is_dir():
        raise ExportError(f"cannot write {out}: it is a directory")
    try:
        with replacing(out) as tmp:
            write_onnx(model, tmp, opset, batch)
            summary = describe(tmp)
            if opset is not None and summary["opset"] != opset:
                # the exporter falls back to its own opset when the version conversion fails, with only a log line
                got = summary["opset"]
                raise ExportError(f"asked for opset {opset}, but the exporter could only write opset {got}")
            if check:
                summary.update(check_against_torch(tmp, model, (batch,) if batch else CHECK_BATCHES, atol))
                summary["checked_batches"] = [batch] if batch else list(CHECK_BATCHES)
    except OSError as e:  # an output folder that cannot be made or written
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    summary.update(
        path=str(out), bytes=out.stat().st_size, checkpoint=str(checkpoint_path), role=describe_role(ckpt),
        arch=ckpt["arch"], variant=ckpt["variant"],
    )
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """A few lines: what was exported where, the graph's inputs/outputs, and the check's result."""
    role = s["role"]
    lines = [
        f"askd.export: {s['checkpoint']} ({role}, {s['arch']}/{s['variant']}) -> {s['path']} "
        f"({s['bytes'] / 2**20:.2f} MiB, opset {s['opset']})"
    ]
    for kind, values in (("input ", s["inputs"]), ("output", s["outputs"])):
        for v in values:
            lines.append(f"  {kind} {v['name']:<10} {v['dtype']} [{', '.join(map(str, v['shape']))}]")
    if "max_abs_diff" in s:
        batches = ", ".join(map(str, s["checked_batches"]))
        plural = "es" if len(s["checked_batches"]) > 1 else ""
        lines.append(
            f"  onnxruntime vs PyTorch on batch{plural} {batches}: max abs diff {s['max_abs_diff']:.2e} "
            f"(tolerance {s['tolerance']:.1e}, max |embedding| {s['embedding_scale']:.3g})"
        )
    else:
        lines.append("  not checked against PyTorch (--no-check)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m askd.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="an askd checkpoint.pt (teacher/ or student_<method>/ of a run folder)")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET}; default: the exporter's)")
    p.add_argument("--static-batch", type=int, default=None, metavar="B", help="fix the batch size (default: dynamic)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch comparison")
    p.add_argument("--atol", type=float, default=ATOL, help="check tolerance, times max(1, max |embedding|)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = export_onnx(args.checkpoint, args.out, args.opset, args.static_batch, not args.no_check, args.atol)
    except (CheckpointError, ExportError) as e:
        print(f"askd.export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("askd.export: interrupted; nothing written", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
