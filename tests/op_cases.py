"""What tests/test_op_cbam.py and tests/test_op_cosine_distill.py share: the (backend, device) cases, the one
tolerance table, the comparisons against the references, and compiling the Triton kernels for a GPU.

Every op test takes ``backend, device`` from :data:`ALL` (torch, triton, ext on the CPU and, where there is one,
the GPU), :data:`FUSED` (triton and ext, for tests that compare a fused backend with the torch one) or
:data:`EXT` (the compiled extension's own checks). A case is skipped with ``askd.backend.availability``'s reason
where its backend cannot run on its device. Triton runs on the CPU only under ``TRITON_INTERPRET=1``, which
tests/conftest.py sets before any kernel is decorated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from askd.backend import availability

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "triton", "ext")
# the GPU joins where there is one: the CUDA kernels and compiled Triton then face the same cases
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

NAN = float("nan")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (rtol, atol) for a compared tensor of each dtype: y and dx and the loss gradients come back in x's dtype, the maps,
# statistics and losses in float32 (float64 for float64 input). atol is relative to the tensor's largest value
# (at least 1), since gradients grow with the map size. The backends accumulate in float32 from the same input as
# the references, so float32 tensors differ by summation order (also the maps of bfloat16 / float16 input), and
# low-precision outputs by about one rounding step of the final cast.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}


def backend_params(names: tuple[str, ...] = BACKENDS) -> list:
    """pytest params (backend, device) for every device and name, skipped where the backend cannot run there."""
    params = []
    for device in DEVICES:
        reasons = availability(device)
        for name in names:
            reason = reasons[name]
            skip = pytest.mark.skipif(reason is not None, reason=f"{name} on {device}: {reason}")
            params.append(pytest.param(name, device, marks=skip, id=f"{name}-{device}"))
    return params


ALL = pytest.mark.parametrize("backend,device", backend_params())
FUSED = pytest.mark.parametrize("backend,device", backend_params(("triton", "ext")))
EXT = pytest.mark.parametrize("backend,device", backend_params(("ext",)))


def interpreted(backend: str, device: str) -> bool:
    """Whether the case runs the Triton interpreter (~80x slower than eager): some checks then run lighter."""
    return backend == "triton" and device == "cpu"


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """got equals want in shape, dtype and device, and in value within TOL[want.dtype] (indices: exactly)."""
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), name
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{name}: indices differ"
        return
    rtol, atol = TOL[want.dtype]
    scale = max(want.abs().nan_to_num(0).max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{name}: {m}")


def assert_same_nans(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN where want has NaN, and nowhere else: what the NaN tests compare instead of the finite values."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: {int(got.isnan().sum())} NaNs where PyTorch has {int(want.isnan().sum())}"
    )


# Compiles every kernel of one askd.kernels module for sm_90 (bf16 x and maps, float32 acc) in a fresh interpreter:
# the kernels in this process are the interpreter's, which the compiler cannot take.
COMPILE_FOR_GPU = """
import importlib, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module = importlib.import_module(sys.argv[1])
pointer = {"x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "table_ptr": "*i64",
           "idx_c_ptr": "*i32", "idx_s_ptr": "*i32", "count_ptr": "*i32"}
constants = {"ACC": tl.float32, "BLOCK_C": 16, "BLOCK_P": 128, "DT": tl.bfloat16, "EPS": 1e-8, "BLOCK": 1024,
             "BLOCK_LOSS": 256}
kernels = [getattr(module, n) for n in dir(module) if n.startswith("_") and n.endswith("_kernel")]
for fn in kernels:
    consts = {k: v for k, v in constants.items() if k in fn.arg_names}
    signature = {a: "constexpr" if a in consts else pointer.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], fn.__name__
print(len(kernels), "compiled")
"""


def assert_kernels_compile_for_a_gpu(module: str, count: int, tmp_path: Path) -> None:
    """All ``count`` kernels of ``module`` compile for a GPU: catches what the interpreter allows but the compiler
    rejects (types, loop bounds, pointer casts), with no GPU needed."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", COMPILE_FOR_GPU, module]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"{count} compiled"
