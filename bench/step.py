"""Whole IR-50 A-SKD training steps on a CPU against the machine's roofs, and against the time their convolutions
take alone.

    python -m bench.step [--arch ir50_cbam] [--batch 32] [--rounds 3] [--setups eager,fused_amp_cl]
                         [--malloc keep|default] [--steps-only] [--inference] [--out bench/results/NAME]

What it measures, in one process and in this order:
- the roofs (:func:`bench.roofs.measure`: the best large mm / channels_last 3x3 convolution, the copy bandwidth);
- the step's convolutions alone: every distinct conv layer of ``arch`` at ``batch``, channels_last, forward and
  forward+backward timed on its own (best of 3), summed as the step runs them (the teacher's forward, the
  student's forward and backward, the stem without an input gradient). The step's FLOPs over that time is the
  rate the step could reach if everything between the convolutions took no time and every convolution ran as
  fast as it does alone: the *conv ceiling*;
- the training steps of ``--setups`` (names of :data:`bench.test_train_step.SETUPS`: ``eager`` is the
  authors' way, fp32 NCHW; ``fused_amp_cl`` is ``--fused --channels-last``, plus ``--amp bf16`` on a CPU with
  native bf16), built as ``askd.train`` builds them, one warm-up step each, then ``--rounds`` rounds
  interleaved (eager, fused, eager, fused, ...); each step's minor page faults are counted too;
- one profiled step of each set-up: its self time split into convolution forward and backward, BatchNorm,
  PReLU, the fused CBAM and loss, and the rest.

``--malloc keep`` (the default) first does what ``askd.train`` does on a CPU (:func:`askd.hostmem.keep_freed_memory`);
``--malloc default`` leaves glibc's malloc as it is, to measure that choice (one process each, alternated:
the setting is per process). ``--steps-only`` times the steps and nothing else; ``--inference`` times batches
through a frozen model as ``askd.eval`` embeds them (:func:`inference_step`) instead. ``--out NAME`` writes
NAME.json and NAME.md. Not part of ``pytest bench/``: an IR-50 step takes seconds to tens of seconds on a small CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from askd import hostmem, models

from . import roofs
from .conftest import cpu_model
from .test_train_step import SETUPS, make_step

# profiler op name (a prefix) -> the part of the step it belongs to; the first match wins
PARTS = [
    ("aten::mkldnn_convolution", "conv forward"),
    ("aten::convolution_backward", "conv backward"),
    ("aten::native_batch_norm", "BatchNorm"),
    ("aten::_prelu", "PReLU"),
    ("askd::prelu", "PReLU"),
    ("aten::prelu", "PReLU"),
    ("askd::cbam", "CBAM"),
    ("askd::cosine_distill", "A-SKD loss"),
]


def conv_layers(arch: str, batch: int) -> collections.Counter:
    """(input shape, in, out, kernel, stride, padding) -> how many of ``arch``'s convolutions have it, from one
    forward with hooks."""
    model = models.create(arch, backend="torch").eval()
    counts = collections.Counter()

    def hook(m, inputs, output):
        counts.update([((batch, *inputs[0].shape[1:]), m.in_channels, m.out_channels, m.kernel_size[0],
                        m.stride[0], m.padding[0])])  # fmt: skip

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 112))
    for h in hooks:
        h.remove()
    return counts


def time_layer(shape: tuple, cin: int, cout: int, k: int, stride: int, pad: int) -> dict:
    """One conv layer (no bias) on a channels_last (B,C,H,W) input of ``shape``: its forward and its backward
    (input and weight gradients; the weight's alone for the stem, whose input is the image) timed alone."""
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(cin != 3)
    with torch.no_grad():
        grad = torch.randn_like(conv(x))
    flops = 2 * grad.numel() * cin * k * k

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        conv.weight.grad = None
        conv(x).backward(grad)

    fwd = roofs.best_seconds(forward, 3)
    bwd = roofs.best_seconds(forward_backward, 3) - fwd
    bwd_flops = flops * (2 if x.requires_grad else 1)
    return {"forward_s": fwd, "backward_s": bwd, "flops": flops, "backward_flops": bwd_flops,
            "forward_gflops": flops / fwd / 1e9, "backward_gflops": bwd_flops / bwd / 1e9}  # fmt: skip


def conv_alone(arch: str, batch: int) -> dict:
    """The convolutions of one step timed alone (see the module docstring): {"seconds", "flops", "layers": [...]},
    each layer as the step runs it: the teacher's forward and the student's, then the student's backward."""
    rows, seconds, flops = [], 0.0, 0
    for (shape, cin, cout, k, stride, pad), n in conv_layers(arch, batch).items():
        t = time_layer(shape, cin, cout, k, stride, pad)
        rows.append({"input": list(shape), "in": cin, "out": cout, "kernel": k, "stride": stride, "count": n, **t})
        seconds += n * (2 * t["forward_s"] + t["backward_s"])
        flops += n * (2 * t["flops"] + t["backward_flops"])
    return {"seconds": seconds, "flops": flops, "layers": rows}


def split(prof) -> dict[str, float]:
    """A profiled step's self time per part of :data:`PARTS` (and "other"), as shares of the step's self time."""
    parts, total = collections.Counter(), 0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        part = next((p for prefix, p in PARTS if event.key.startswith(prefix)), "other")
        parts[part] += event.self_cpu_time_total
    return {p: t / total for p, t in parts.most_common()}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(steps: dict, rounds: int, warmup: int = 1) -> dict:
    """Interleaved rounds of every step after ``warmup`` calls of each (compilation, the first allocations):
    {set-up: {"median_s", "times_s", "faults_per_step"}}."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times, faults = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            before, start = minor_faults(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - before)
    return {k: {"median_s": statistics.median(times[k]), "times_s": times[k],
                "faults_per_step": statistics.median(faults[k])} for k in steps}  # fmt: skip


def inference_step(arch: str, batch: int):
    """One batch through a frozen ``arch`` as ``askd.eval`` embeds it: the model as loaded (NCHW, the default
    backend), eval mode, ``torch.inference_mode()``; the HR side, 112 px."""
    model = models.create(arch).eval()
    x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))

    def step():
        with torch.inference_mode():
            model(x)

    return step


def report(result: dict) -> str:
    """The markdown of one run's result."""
    r, roof = result, result["roofs"]["float32"]["gflops"]
    batch, flops = r["batch"], r["step_flops"]
    ceiling = flops / r["conv_alone"]["seconds"] / 1e9
    lines = [
        f"# {r['arch']} A-SKD training step, B={batch}, float32, CPU: {r['machine']}",
        "",
        f"- command: `{r['command']}`; torch {r['torch']}, {r['threads']} threads; {r['malloc']}",
        f"- step FLOPs {flops / 1e9:.1f} G ({flops / batch / 1e9:.1f} G per image): the teacher's forward, the "
        "student's forward and backward, counted on the meta device (bench.roofs.step_flops)",
        f"- roofs: fp32 compute {roof:.1f} GFLOP/s ({r['roofs']['float32']['by']}); "
        f"copy {r['roofs']['copy']['gbs']:.1f} GB/s",
        f"- conv ceiling: the step's convolutions alone (each layer by itself, channels_last, best of 3) take "
        f"{r['conv_alone']['seconds']:.2f} s: {ceiling:.1f} GFLOP/s, {ceiling / roof:.0%} of the roof",
        "",
        "| set-up | s/step (median) | images/s | vs eager | GFLOP/s | % of roof | % of conv ceiling "
        "| page faults/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = r["steps"].get("eager", {}).get("median_s")
    for name, s in r["steps"].items():
        rate = flops / s["median_s"] / 1e9
        ratio = f"{eager / s['median_s']:.2f}x" if eager else "-"
        lines.append(f"| {name} | {s['median_s']:.2f} | {batch / s['median_s']:.2f} | {ratio} | {rate:.1f} | "
                     f"{rate / roof:.0%} | {rate / ceiling:.0%} | {s['faults_per_step']:,.0f} |")  # fmt: skip
    splits = r["split"].values()
    parts = sorted({p for s in splits for p in s}, key=lambda p: -max(s.get(p, 0) for s in splits))
    lines += ["", "Where a step's self time goes (torch.profiler, one step each):", "",
              "| part | " + " | ".join(r["split"]) + " |", "|---|" + "---:|" * len(r["split"])]  # fmt: skip
    for p in parts:
        lines.append(f"| {p} | " + " | ".join(f"{s.get(p, 0):.1%}" for s in r["split"].values()) + " |")
    lines += ["", "The convolutions alone (GFLOP/s; backward = input and weight gradients):", "",
              "| input | in -> out | kernel/stride | count | forward | backward |", "|---|---|---|---:|---:|---:|"]
    for c in r["conv_alone"]["layers"]:
        lines.append(f"| {tuple(c['input'][1:])} | {c['in']} -> {c['out']} | {c['kernel']}/{c['stride']} "
                     f"| {c['count']} | {c['forward_gflops']:.0f} | {c['backward_gflops']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ir50_cbam")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000, help="classes of the ArcFace head")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--setups", default="eager,fused_amp_cl", help="comma list of " + ", ".join(SETUPS))
    p.add_argument("--malloc", choices=("keep", "default"), default="keep")
    p.add_argument("--steps-only", action="store_true", help="time the steps only (no roofs, conv ceiling, profile)")
    p.add_argument("--inference", action="store_true",
                   help="time batches through a frozen model as askd.eval runs them instead (implies --steps-only)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()
    setups = args.setups.split(",")
    if unknown := [s for s in setups if s not in SETUPS]:
        p.error(f"unknown set-up {', '.join(unknown)}; expected some of {', '.join(SETUPS)}")
    malloc = hostmem.keep_freed_memory() if args.malloc == "keep" else "malloc as glibc's default"
    if args.inference:
        steps = {"inference": inference_step(args.arch, args.batch)}
    else:
        steps = {name: make_step(name, args.arch, args.batch, args.classes, "cpu") for name in setups}
    if args.steps_only or args.inference:
        for name, s in time_steps(steps, args.rounds).items():
            print(f"{args.arch} B={args.batch} {name}, {malloc}: median {s['median_s']:.2f} s/step; steps "
                  + ", ".join(f"{t:.2f}" for t in s["times_s"]) + f"; {s['faults_per_step']:,.0f} page faults/step")
        return
    print(f"{args.arch} B={args.batch}: roofs ...", flush=True)
    result = {
        "arch": args.arch, "batch": args.batch, "classes": args.classes, "malloc": malloc, "machine": cpu_model(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python -m bench.step " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "roofs": roofs.measure("cpu"),
        "step_flops": roofs.step_flops(args.arch, args.batch, args.classes)["total"],
    }  # fmt: skip
    print("the convolutions alone ...", flush=True)
    result["conv_alone"] = conv_alone(args.arch, args.batch)
    print(f"steps: {', '.join(setups)}, {args.rounds} rounds ...", flush=True)
    result["steps"] = time_steps(steps, args.rounds)
    result["split"] = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        result["split"][name] = split(prof)
    text = report(result)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(text)


if __name__ == "__main__":
    main()
