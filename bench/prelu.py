"""PReLU forward+backward, aten (``nn.PReLU``) against askd's (:class:`askd.nn.prelu.PReLU`, backend ext), on a CPU.

    python -m bench.prelu [--batch 32] [--reps 9] [--layout channels_last|nchw|both] [--step ROUNDS]

Every PReLU input shape of ``ir50_cbam`` at 112 px (counted from a forward: the stem, and per block the PReLU at
the block's input resolution), float32, both modules timed in turn (aten, ext, aten, ext, ...) and each shape's
median reported, with the total over the 25 PReLUs of a step. ``--step ROUNDS`` also times whole ``askd.train``
steps of ir50_cbam (``--fused --channels-last``, float32, an A-SKD student with its frozen teacher), the PReLU
backward switched between aten and ext between steps, interleaved likewise, and profiles one step of each for
the PReLU ops' share of the step's self time. Not part of ``pytest bench/``; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch import nn

from askd import models
from askd.nn.prelu import PReLU
from askd.ops import prelu as prelu_ops


def ir50_prelu_shapes() -> collections.Counter:
    """(C, H, W) -> how many of ir50_cbam's PReLUs see that shape, from one forward with hooks."""
    model = models.create("ir50_cbam", backend="torch").eval()
    counts = collections.Counter()
    hooks = [
        m.register_forward_hook(lambda m, i, o: counts.update([tuple(i[0].shape[1:])]))
        for m in model.modules()
        if isinstance(m, nn.PReLU)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 112))
    for h in hooks:
        h.remove()
    return counts


def fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    module.weight.grad = None
    module(x.detach().requires_grad_()).backward(g)


def modules(batch: int, reps: int, layouts: list[torch.memory_format]) -> None:
    counts = ir50_prelu_shapes()
    print(f"threads {torch.get_num_threads()}; B={batch} float32; fwd+bwd medians of {reps}, aten and ext interleaved")
    for layout in layouts:
        name = "channels_last" if layout == torch.channels_last else "NCHW"
        totals = {"aten": 0.0, "ext": 0.0}
        for (C, H, W), n in counts.items():
            x = torch.randn(batch, C, H, W).contiguous(memory_format=layout)
            g = torch.randn(batch, C, H, W).contiguous(memory_format=layout)
            impls = {"aten": nn.PReLU(C), "ext": PReLU(C, backend="ext")}
            times = {k: [] for k in impls}
            for module in impls.values():
                fwd_bwd(module, x, g)  # warm-up
            for _ in range(reps):
                for k, module in impls.items():
                    start = time.perf_counter()
                    fwd_bwd(module, x, g)
                    times[k].append(time.perf_counter() - start)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            for k in totals:
                totals[k] += n * med[k]
            print(f"{name:13s} {(C, H, W)!s:15s} x{n:<2d} aten {med['aten']:7.1f} ms  ext {med['ext']:7.1f} ms  "
                  f"ratio {med['aten'] / med['ext']:.2f}")  # fmt: skip
        print(f"{name}: the {sum(counts.values())} PReLUs of a step: aten {totals['aten']:.0f} ms, "
              f"ext {totals['ext']:.0f} ms, ratio {totals['aten'] / totals['ext']:.2f}")  # fmt: skip


def train_step(batch: int, rounds: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from askd.config import Config
    from askd.losses import build
    from askd.train import Phase, Trainer, build_model, freeze, random_flips, teacher_forward, to_input

    arch, classes, device = "ir50_cbam", 1000, torch.device("cpu")
    cfg = Config(arch=arch, batch_size=batch, method="askd", device="cpu", fused=True, amp="off", channels_last=True)
    teacher, teacher_head = freeze(*build_model(cfg, arch, classes, device))
    phase = Phase("student", build("askd", cfg, classes), arch, teacher_forward(cfg, teacher), teacher_head)
    trainer = Trainer.create(cfg, phase, classes, 1000, device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    ext = prelu_ops.EXT_DEVICES

    def step(impl: str) -> None:
        prelu_ops.EXT_DEVICES = ext if impl == "ext" else frozenset()  # aten: PReLU runs nn.PReLU's autograd
        hr = to_input(images, device, random_flips(batch, cfg.seed, trainer.step), cfg.channels_last)
        trainer.train_step(hr, labels)

    try:
        for impl in ("aten", "ext"):
            step(impl)  # warm-up
        times = {"aten": [], "ext": []}
        for _ in range(rounds):
            for impl in times:
                start = time.perf_counter()
                step(impl)
                times[impl].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{arch} step B={batch} fp32 channels_last --fused, medians of {rounds} interleaved: aten "
              f"{med['aten']:.2f} s, ext {med['ext']:.2f} s, ratio {med['aten'] / med['ext']:.3f}")  # fmt: skip
        for impl in times:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(impl)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            ops = {e.key: e.self_cpu_time_total for e in events if "prelu" in e.key.lower() and "::" in e.key}
            print(f"{impl}: step self time {total / 1e6:.1f} s; "
                  + ", ".join(f"{k} {t / 1e3:.0f} ms ({t / total:.1%})" for k, t in sorted(ops.items())))  # fmt: skip
    finally:
        prelu_ops.EXT_DEVICES = ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--layout", choices=("channels_last", "nchw", "both"), default="both")
    parser.add_argument("--step", type=int, default=0, metavar="ROUNDS", help="also time ROUNDS train steps of each")
    args = parser.parse_args()
    if "cpu" not in prelu_ops.EXT_DEVICES:
        raise SystemExit("askd._C has no CPU prelu_backward kernel: pip install --no-build-isolation -e .")
    layouts = {"channels_last": [torch.channels_last], "nchw": [torch.contiguous_format]}
    modules(args.batch, args.reps, layouts.get(args.layout, [torch.channels_last, torch.contiguous_format]))
    if args.step:
        train_step(args.batch, args.step)


if __name__ == "__main__":
    main()
