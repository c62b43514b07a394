"""Host memory: keep the memory a CPU training step frees for the next step (glibc malloc settings).

Why: a CPU training step allocates and frees the same activations every step, many of them larger than glibc's
largest mmap threshold (32 MiB on 64-bit). glibc serves such a block with a fresh ``mmap`` and returns it
to the kernel on ``free``, so every step faults its activations in again, page by page, each page zero-filled by
the kernel. Measured on a 2-core AMD EPYC (AVX2), an ir50_cbam A-SKD step at B=32 (fp32, ``--fused
--channels-last``) took 0.53-0.60 M minor page faults with glibc's default and none once the heap had grown to the
step's peak with the settings below, and ran 1.14x faster (1.07-1.21x over three alternating pairs of processes;
bench/results/cpu-epyc-2core-ir50-malloc.md).

The cost: the process keeps its peak heap until it exits (it is not trimmed back to the kernel), which a
training process would reach again on the next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) name -> (its parameter number in glibc's <malloc.h>, the value set): no mmap'd blocks (everything
# comes from the heap and is reused), never trim the heap (-1 turns trimming off), grow it 1 GiB at a time
KEEP = {"M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, -1), "M_TOP_PAD": (-2, 1 << 30)}


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> str:
    """Apply :data:`KEEP` to this process's malloc; returns a line that says what was done (or why not: a C
    library other than glibc, as on macOS or musl, is left as it is). Safe to call more than once."""
    libc = _glibc()
    if libc is None:
        return "malloc left as it is (not glibc)"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    failed = [name for name, (param, value) in KEEP.items() if libc.mallopt(param, value) != 1]
    if failed:
        return "glibc refused mallopt " + ", ".join(failed) + "; malloc partly as it was"
    return "malloc keeps freed memory (glibc: no mmap'd blocks, no heap trimming)"
