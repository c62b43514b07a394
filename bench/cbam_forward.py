"""CBAM forward alone (inference) on a CPU, askd's ext kernel against torch.compile of the eager module, interleaved.

    python -m bench.cbam_forward [--rounds 60] [--batch 32]

The IR-50 stage shapes of ``bench/test_cbam.py``, channels_last, float32, under no_grad, malloc as
``askd.train`` sets it on a CPU. Unlike pytest-benchmark, which times one implementation's rounds and then the
next, this alternates the two call by call (compile, ext, compile, ext, ...), so a shared machine that slows
down part-way slows both alike; it prints both medians and the ratio. Not part of ``pytest bench/``.
"""

from __future__ import annotations

import argparse
import functools

import torch

from askd import hostmem

from .conftest import STAGES
from .step import time_steps
from .test_cbam import make


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cbam_forward", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    hostmem.keep_freed_memory()
    torch.manual_seed(0)
    for C, H in STAGES:
        x = torch.randn(args.batch, C, H, H).contiguous(memory_format=torch.channels_last)
        modules = {"compile": make("compile", C), "ext": make("ext", C)}
        with torch.no_grad():
            timed = time_steps({k: functools.partial(m, x) for k, m in modules.items()}, args.rounds, warmup=3)
        med = {k: t["median_s"] * 1e3 for k, t in timed.items()}
        print(f"C={C} H=W={H}: compile {med['compile']:.2f} ms, ext {med['ext']:.2f} ms, "
              f"{med['compile'] / med['ext']:.2f}x compile", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
