"""Build script for the compiled extension ``askd._C`` (metadata lives in pyproject.toml).

C++ sources come from ``csrc/`` and ``csrc/cpu/``; CUDA sources (``csrc/cuda/*.cu``) are added only when
torch was built with CUDA and nvcc is found, or when ``ASKD_FORCE_CUDA=1``.
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def with_cuda() -> bool:
    return os.environ.get("ASKD_FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not with_cuda():
        return CppExtension("askd._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return CUDAExtension(
        "askd._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("ASKD_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=link,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
