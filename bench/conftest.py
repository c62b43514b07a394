"""Shared set-up of the benchmarks: the device, its sizes and dtype, synchronisation, the machine description.

CPU: B=32, float32; GPU: B=128, bfloat16 (the issue's sizes). Every timed function synchronises the device
before it returns; inputs are built outside the timed part; warm-up (and compilation) happens first.
``profile_call`` adds, outside the timing, one profiled call: its peak memory and the ops its time goes to.
On a CPU, malloc keeps freed memory as ``askd.train`` has it (:mod:`askd.hostmem`; machine_info["malloc"];
``$ASKD_BENCH_MALLOC=default`` leaves glibc's default).
The machine's roofs (:mod:`bench.roofs`) are measured once at the start of the session, before any benchmark,
and saved in the JSON's machine_info (tiny sizes in a smoke run, ``--benchmark-disable``); at the end the
terminal summary prints them and every timed benchmark's share of its roof (:func:`bench.report.roofline`).
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from askd import _ext, backend, hostmem

from . import roofs as roofline
from .report import roofline_section

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
    if impl in ("eager", "compile", "reference"):
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


def amp_dtype() -> torch.dtype | None:
    """Autocast dtype of the benchmarks' "amp" set-ups, or None (float32) where autocast would only slow down.

    bf16 on CUDA and on CPUs whose oneDNN has bf16 kernels; None on other CPUs (on a 2-core AVX2 EPYC, bf16
    autocast made a training step 6.5x slower than float32). ``$ASKD_BENCH_AMP=bf16|off`` overrides.
    """
    choice = os.environ.get("ASKD_BENCH_AMP", "auto")
    if choice not in ("auto", "bf16", "off"):
        raise ValueError(f"ASKD_BENCH_AMP={choice!r}; expected auto, bf16 or off")
    if choice == "auto":
        native = DEVICE == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        choice = "bf16" if native else "off"
    return torch.bfloat16 if choice == "bf16" else None


def profile_call(fn, top: int = 12) -> dict:
    """Run ``fn`` once under torch.profiler: peak memory and where its time goes.

    Returns ``peak_mb``: the most memory its tensors held at once beyond what was live before the call (on
    CUDA from the allocator's peak counter, on the CPU from the profiler's allocation events); and
    ``profile``: the ``top`` ops by self time as [name, self ms, % of all self time, calls].
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    if DEVICE == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with profile(activities=activities, profile_memory=DEVICE == "cpu") as prof:
        fn()
    if DEVICE == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_bytes(prof.profiler.kineto_results.events())
    key = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in ops) or 1.0
    rows = [[_op_name(e.key), round(getattr(e, key) / 1e3, 3), round(100 * getattr(e, key) / total, 1), e.count]
            for e in ops[:top]]
    return {"peak_mb": round(peak / 2**20, 1), "profile": rows}


def _op_name(key: str) -> str:
    """Profiler op names, with inductor's "## Call CompiledFxGraph <52-char hash> ##" cut to a short tag."""
    if key.startswith("## Call CompiledFxGraph"):
        return f"inductor graph {key.split()[3][:8]}"
    return key


def _peak_bytes(events) -> int:
    """Highest running total of the profiler's allocation (+) and free (-) events, in time order."""
    sizes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peak = live = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
    return peak


ROOFS: dict = {}  # filled by the session fixture below, read by the machine_info hook at the end


def set_malloc() -> str:
    """On a CPU, malloc as ``askd.train`` sets it (:func:`askd.hostmem.keep_freed_memory`), so the steps and
    kernels here run as they do there; ``$ASKD_BENCH_MALLOC=default`` leaves glibc's default, as a plain PyTorch
    process has it."""
    choice = os.environ.get("ASKD_BENCH_MALLOC", "keep")
    if choice not in ("keep", "default"):
        raise ValueError(f"ASKD_BENCH_MALLOC={choice!r}; expected keep or default")
    if DEVICE != "cpu":
        return "malloc as it is (CUDA device)"
    return hostmem.keep_freed_memory() if choice == "keep" else "malloc as glibc's default"


MALLOC = set_malloc()


@pytest.fixture(scope="session", autouse=True)
def roofs(request) -> dict:
    """The machine's roofs, measured before the first benchmark of the session."""
    if not ROOFS:
        ROOFS.update(roofline.measure(DEVICE, small=request.config.getoption("benchmark_disable")))
    return ROOFS


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["roofs"] = ROOFS
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu: {cpu_model()}"
    machine_info["threads"] = torch.get_num_threads()
    machine_info["malloc"] = MALLOC
    machine_info["askd_ext"] = _ext.build_info() if _ext.load() is not None else f"unavailable: {_ext.error()}"
    machine_info["batch"], machine_info["dtype"] = BATCH, str(DTYPE)
    machine_info["cpu_model"] = cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)} logical CPUs" if names else platform.processor()
    except OSError:
        return platform.processor() or os.uname().machine


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter, config):
    """The roofs and each timed benchmark's share of them, as bench.report's roofline section prints them."""
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's session: its timed benchmarks
    timed = [b for b in getattr(session, "benchmarks", []) if b.stats is not None and b.stats.rounds]
    if not ROOFS or not timed:
        return
    medians, extra = defaultdict(dict), defaultdict(dict)
    for b in timed:
        impl = (b.params.get("impl") or b.params.get("setup")) if b.params else b.name
        medians[b.group][impl], extra[b.group][impl] = b.stats.median, b.extra_info
    terminalreporter.write_sep("=", "askd roofline")
    for line in roofline_section({"roofs": ROOFS}, medians, extra):
        terminalreporter.write_line(line)
