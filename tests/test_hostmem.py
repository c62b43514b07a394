"""askd.hostmem: glibc's malloc told to keep freed memory, checked by where a large block comes from."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from askd import hostmem

GLIBC = hasattr(hostmem._glibc(), "mallinfo2")  # None (another C library) has no mallinfo2 either

# In a fresh interpreter (the setting is process-wide): malloc 64 MiB and print how many bytes glibc holds in
# mmap'd blocks before and after (mallinfo2's hblkhd), with or without keep_freed_memory() first.
PROBE = textwrap.dedent("""
    import ctypes, sys
    from askd import hostmem
    if sys.argv[1] == "keep":
        print(hostmem.keep_freed_memory(), file=sys.stderr)
    libc = hostmem._glibc()
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    print(libc.mallinfo2().hblkhd - before)
""")


def mmapped_growth(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="needs glibc >= 2.33 (mallopt and mallinfo2): the C library here is another")
def test_large_blocks_come_from_the_heap_once_kept():
    assert mmapped_growth("default") >= 64 << 20  # glibc's default: a 64 MiB block is its own mmap
    assert mmapped_growth("keep") == 0


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(hostmem, "_glibc", lambda: None)
    assert hostmem.keep_freed_memory() == "malloc left as it is (not glibc)"


def test_a_refused_setting_is_named(monkeypatch):
    class Libc:
        def __init__(self):
            self.mallopt = lambda param, value: 0 if param == -1 else 1

    monkeypatch.setattr(hostmem, "_glibc", Libc)
    assert hostmem.keep_freed_memory() == "glibc refused mallopt M_TRIM_THRESHOLD; malloc partly as it was"
