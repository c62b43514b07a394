"""The CUDA sources compile: nvcc, compile-only, every ``csrc/cuda/*.cu`` against this torch's headers.

Needs nvcc but no GPU and no CUDA build of torch, so it runs in CI: it catches syntax, template and type errors
in the kernels (and warnings in our own files). What the kernels compute is tested on a GPU by
the ``ext-cuda`` cases of ``tests/test_op_cbam.py`` and ``tests/test_op_cosine_distill.py``. The sources compile in
parallel; each test waits for its own file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# what setup.py's CUDAExtension passes nvcc, less -O3 (compile time; the code is the same)
ARCH = ["-gencode", "arch=compute_80,code=sm_80"]  # sm_80: native bf16 arithmetic


def find_nvcc() -> str | None:
    """nvcc on PATH, else under torch's CUDA_HOME, else None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = find_nvcc()


def include_dirs() -> list[str]:
    return [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]


def nvcc_command(source: Path, obj: Path) -> list[str]:
    flags = [
        "-std=c++20",  # torch 2.13's headers need C++20, as cpp_extension passes
        "-DASKD_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-Xcompiler",
        "-fPIC",
        *ARCH,
    ]
    # CPU wheels of torch ship the c10/cuda headers but not the CMake-generated c10/cuda/impl/cuda_cmake_macros.h
    # (it only sets a Windows DLL-export macro); this switch makes c10/cuda/CUDAMacros.h skip it
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in include_dirs()):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [NVCC, "-c", str(source), "-o", str(obj), *flags, *(f"-I{d}" for d in include_dirs())]


def compile_one(source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = nvcc_command(source, out_dir / f"{source.stem}.o")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Future]:
    """Starts nvcc on every source at once; maps file name -> future of its CompletedProcess."""
    if NVCC is None:
        pytest.skip("nvcc not found (neither on PATH nor under torch's CUDA_HOME); CUDA sources not compiled")
    out_dir = tmp_path_factory.mktemp("nvcc")
    workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {src.name: pool.submit(compile_one, src, out_dir) for src in SOURCES}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_cuda_sources_exist():
    assert SOURCES, "csrc/cuda/ holds no .cu files"


def test_cuda_headers_in_torch():
    """Every c10/cuda or ATen/cuda header the sources include ships with this torch (the CPU wheel too)."""
    dirs = [Path(d) for d in include_dirs()]
    for source in SOURCES:
        for header in re.findall(r"#include <((?:c10|ATen)/cuda/[^>]+)>", source.read_text()):
            assert any((d / header).is_file() for d in dirs), f"{source.name} includes <{header}>, not in {dirs}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, compiled: dict[str, Future]):
    result = compiled[source.name].result()
    assert result.returncode == 0, f"nvcc failed on {source.name} (rc {result.returncode}):\n{result.stderr}"
    # warnings from torch's headers are theirs; none may come from ours
    ours = [line for line in result.stderr.splitlines() if "warning" in line and str(ROOT / "csrc") in line]
    assert not ours, f"nvcc warned on {source.name}:\n{result.stderr}"
