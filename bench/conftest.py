"""Shared set-up of the benchmarks: the device, its sizes and dtype, synchronisation, the machine description.

CPU: B=32, float32; GPU: B=128, bfloat16 (the issue's sizes). Every timed function synchronises the device
before it returns; inputs are built outside the timed part; warm-up (and compilation) happens first.
"""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch

from askd import _ext, backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 128 if DEVICE == "cuda" else 32
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# the four IR-50 CBAM stage shapes at 112x112 input: (C, H=W)
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]
IMPLS = ("eager", "compile", "ext", "triton")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def skip_reason(impl: str) -> str | None:
    """Why ``impl`` cannot be benchmarked here, or None."""
    if impl in ("eager", "compile"):
        return None
    if impl == "triton" and DEVICE == "cpu":
        return "Triton runs on a CPU only in its interpreter, a testing mode"
    return backend.availability(DEVICE)[impl]


def warm_up(benchmark, fn, rounds: int = 3) -> None:
    """Run ``fn`` ``rounds`` times before timing; the first run's time (compilation included) goes in extra_info.

    With ``--benchmark-disable`` (a smoke run: every benchmark once, nothing timed) its own single call is enough.
    """
    if benchmark.disabled:
        return
    start = time.perf_counter()
    fn()
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - start, 3)
    for _ in range(rounds - 1):
        fn()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu: {_cpu_model()}"
    machine_info["threads"] = torch.get_num_threads()
    machine_info["askd_ext"] = _ext.build_info() if _ext.load() is not None else f"unavailable: {_ext.error()}"
    machine_info["batch"], machine_info["dtype"] = BATCH, str(DTYPE)
    machine_info["cpu_model"] = _cpu_model()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)} logical CPUs" if names else platform.processor()
    except OSError:
        return platform.processor() or os.uname().machine


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
