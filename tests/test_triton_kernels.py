"""The Triton kernels (``askd.kernels.cbam``, ``askd.kernels.cosine_distill``) against the written-out references in
:mod:`askd.ops`: values, maps, indices, gradients, layouts, odd sizes, the registered ops (opcheck) and one
``torch.compile(fullgraph=True)`` with a backward.

With a GPU the kernels run compiled on CUDA tensors; without one on CPU tensors under ``TRITON_INTERPRET=1``
(set for the session in tests/conftest.py, before any kernel is decorated). The interpreter is ~80x slower
than eager, so shapes are small (the IR-50 stage shapes run at B <= 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot be tested")

from askd.kernels import cbam as triton_cbam  # noqa: E402
from askd.kernels import cosine_distill as triton_distill  # noqa: E402
from near_ties import check_argmax  # noqa: E402

from askd.ops.cbam import cbam, cbam_backward_ref, cbam_forward_ref, fused_cbam  # noqa: E402
from askd.ops.cosine_distill import (  # noqa: E402
    cosine_distill,
    cosine_distill_backward_ref,
    cosine_distill_forward_ref,
    cosine_distill_ref,
    fused_cosine_distill,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) for tensors in x's dtype ("x") and for the acc-dtype maps, stats and weight gradients ("acc");
# low-precision outputs may differ by a rounding step of the cast on store
TOL = {
    torch.float32: {"x": (1e-5, 1e-5), "acc": (1e-5, 1e-5)},
    torch.float64: {"x": (1e-12, 1e-12), "acc": (1e-12, 1e-12)},
    torch.bfloat16: {"x": (1e-2, 1.6e-2), "acc": (1e-4, 1e-4)},
    torch.float16: {"x": (1e-3, 2e-3), "acc": (1e-4, 1e-4)},
}
if DEVICE == "cuda":
    # on a GPU the kernels and the reference reduce in different orders (tree sums over up to B*H*W terms, the
    # weight gradients over the whole batch): float32 maps and gradients agree to 1e-4 relative, not 1e-5
    TOL[torch.float32] = {"x": (1e-5, 1e-5), "acc": (1e-4, 1e-4)}


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """The references' convolutions and matmuls in full float32 on a GPU (TF32 would be the larger error)."""
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

ROOT = Path(__file__).resolve().parents[1]
FWD_NAMES = ("y", "a_c", "a_s", "chan", "idx_c", "pooled", "idx_s")
BWD_NAMES = ("dx", "dw1", "dw2", "dws")


def close(actual, expected, dtype, kind, name):
    atol, rtol = TOL[dtype][kind]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def cbam_inputs(B, C, H, W, k, channels_last, dtype, seed=0, values=None):
    """x (B,C,H,W) in dtype and layout, weights in float32 at the scale of a trained block (R = C // 16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) if values is None else values
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    R = max(C // 16, 1)
    w1 = torch.randn(R, C, generator=g) / C**0.5
    w2 = torch.randn(C, R, generator=g) / R**0.5
    ws = torch.randn(2, k, k, generator=g) / k
    return x, w1.to(DEVICE), w2.to(DEVICE), ws.to(DEVICE)


def check_cbam(x, w1, w2, ws):
    """Forward outputs and backward gradients of kernels.cbam against cbam_forward_ref / cbam_backward_ref."""
    dtype = x.dtype
    out = triton_cbam.forward(x, w1, w2, ws)
    ref = cbam_forward_ref(x, w1, w2, ws)
    for name, a, e in zip(FWD_NAMES, out, ref, strict=True):
        assert a.dtype == e.dtype and a.stride() == e.stride() and a.device == x.device, name
        if name == "idx_s" and DEVICE == "cuda":
            # argmax over C of x * g_c, and g_c may differ from the reference's in the last bit on a GPU
            B, C, H, W = x.shape
            xc = x.to(ref[1].dtype) * torch.sigmoid(ref[1])[:, :, None, None]
            check_argmax(a.reshape(B, -1), e.reshape(B, -1), xc.flatten(2).transpose(1, 2), TOL[dtype]["acc"])
        elif name.startswith("idx"):
            assert torch.equal(a, e), name
        else:
            close(a, e, dtype, "x" if name == "y" else "acc", name)

    g = torch.Generator().manual_seed(1)
    # dy in x's layout, as the glue hands it
    dy = torch.empty_like(ref[0]).copy_(torch.randn(ref[0].shape, generator=g).to(DEVICE))
    da_c, da_s = (torch.randn(r.shape, generator=g).to(DEVICE) for r in ref[1:3])
    if dtype == torch.float64:
        da_c, da_s = da_c.double(), da_s.double()
    grads = triton_cbam.backward(dy, da_c, da_s, x, w1, w2, ws, *ref[1:])
    expected = cbam_backward_ref(dy, da_c, da_s, x, w1, w2, ws, *ref[1:])
    for name, a, e in zip(BWD_NAMES, grads, expected, strict=True):
        assert a.dtype == e.dtype and a.stride() == e.stride(), name
        close(a, e, dtype, "x" if name == "dx" else "acc", name)


@pytest.mark.parametrize(
    "B, C, H, W, k, channels_last, dtype",
    [
        (1, 13, 7, 5, 3, False, torch.float32),
        (2, 13, 7, 5, 7, True, torch.float32),
        (1, 1, 1, 1, 3, False, torch.float32),
        (2, 13, 7, 5, 3, True, torch.bfloat16),
        (1, 13, 7, 5, 7, False, torch.float16),
        (2, 11, 3, 5, 7, True, torch.float64),
        # IR-50 stages (C, H=W) at tiny B
        (1, 64, 56, 56, 3, True, torch.float32),
        (1, 128, 28, 28, 7, False, torch.bfloat16),
        (1, 256, 14, 14, 3, True, torch.float16),
        (2, 512, 7, 7, 7, False, torch.float32),
    ],
)
def test_cbam_matches_reference(B, C, H, W, k, channels_last, dtype):
    check_cbam(*cbam_inputs(B, C, H, W, k, channels_last, dtype))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cbam_argmax_first_on_ties(channels_last):
    # few distinct values: every channel and pixel max is tied, the first index must win as in torch.max
    values = torch.randint(-1, 2, (2, 19, 9, 7), generator=torch.Generator().manual_seed(3)).float()
    check_cbam(*cbam_inputs(2, 19, 9, 7, 3, channels_last, torch.float32, values=values))


def test_cbam_public_op_noncontiguous_input():
    # a transposed view: the glue makes it contiguous, the gradient comes back in the view's shape
    x, w1, w2, ws = cbam_inputs(2, 11, 5, 7, 3, False, torch.float32)
    results = []
    for backend in ("triton", "torch"):
        xt = x.transpose(2, 3).detach().requires_grad_()
        params = [w.clone().requires_grad_() for w in (w1, w2, ws)]
        y, a_c, a_s = cbam(xt, *params, backend)
        (y.square().sum() + a_c.sin().sum() + a_s.cos().sum()).backward()
        results.append((y, a_c, a_s, xt.grad, *(p.grad for p in params)))
    for name, a, e in zip(("y", "a_c", "a_s", "dx", "dw1", "dw2", "dws"), *results, strict=True):
        close(a, e, torch.float32, "acc", name)


def test_cbam_opcheck():
    x, w1, w2, ws = cbam_inputs(2, 13, 7, 5, 3, True, torch.float32)
    args = (x.requires_grad_(), *(w.requires_grad_() for w in (w1, w2, ws)), "triton")
    torch.library.opcheck(fused_cbam, args)


def distill_maps(B, dtype, seed=0):
    """Teacher and student maps shaped like A-SKD's: channel maps (B,C) and spatial maps (B,1,H,W)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, 13), (B, 1, 7, 5), (B, 64), (B, 1, 56, 56), (B, 3)]
    teacher = [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]
    student = [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]
    return teacher, student


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3])
def test_distill_matches_reference(B, dtype):
    teacher, student = distill_maps(B, dtype)
    if dtype in (torch.float32, torch.float64):
        student[-1][0].zero_()  # |s| = 0: the n <= eps branch (its t / eps overflows float16)
    loss, stats = triton_distill.forward(teacher, student, 0.7)
    ref_loss, ref_stats = cosine_distill_forward_ref(teacher, student, 0.7)
    close(loss, ref_loss, dtype, "acc", "loss")
    close(stats, ref_stats, dtype, "acc", "stats")
    grad = torch.tensor(1.3, dtype=ref_loss.dtype, device=DEVICE)
    grads = triton_distill.backward(grad, teacher, student, stats, 0.7)
    expected = cosine_distill_backward_ref(grad, teacher, student, ref_stats, 0.7)
    for j, (a, e) in enumerate(zip(grads, expected, strict=True)):
        assert a.shape == e.shape and a.dtype == e.dtype, j
        close(a, e, dtype, "x", f"d student {j}")


def test_distill_public_op_autograd():
    teacher, student = distill_maps(2, torch.float32)
    results = []
    for fn in (lambda t, s: cosine_distill(t, s, 0.25, "triton"), lambda t, s: cosine_distill_ref(t, s, 0.25)):
        leaves = [s.clone().requires_grad_() for s in student]
        loss = fn(teacher, leaves)
        loss.backward()
        results.append((loss, *(s.grad for s in leaves)))
    for i, (a, e) in enumerate(zip(*results, strict=True)):
        close(a, e, torch.float32, "acc", f"output {i}")


def test_distill_opcheck():
    teacher, student = distill_maps(2, torch.float32)
    torch.library.opcheck(fused_cosine_distill, (teacher, student, 0.5, "triton", True))


def test_compile_fullgraph_with_backward():
    # one small compiled step: CBAM, then the loss on its maps; fullgraph=True fails on any graph break
    x, w1, w2, ws = cbam_inputs(2, 13, 7, 5, 3, True, torch.float32)
    teacher = [torch.randn(2, 13, device=DEVICE), torch.randn(2, 1, 7, 5, device=DEVICE)]

    def step(x, w1, w2, ws):
        y, a_c, a_s = cbam(x, w1, w2, ws, "triton")
        return cosine_distill(teacher, [a_c, a_s], 0.5, "triton") + y.square().mean()

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, ws)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for name, a, e in zip(("dx", "dw1", "dw2", "dws"), *grads, strict=True):
        close(a, e, torch.float32, "acc", name)


# Compiles every kernel for sm_90 (bf16 x and maps, float32 acc) in a fresh interpreter: the kernels in this
# process are the interpreter's, which the compiler cannot take.
COMPILE_ALL = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from askd.kernels import cbam, cosine_distill

pointer = {"x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "table_ptr": "*i64",
           "idx_c_ptr": "*i32", "idx_s_ptr": "*i32", "count_ptr": "*i32"}
tiles = {"ACC": tl.float32, "BLOCK_C": 16, "BLOCK_P": 128}
rows = {"DT": tl.bfloat16, "ACC": tl.float32, "EPS": 1e-8, "BLOCK": 1024, "BLOCK_LOSS": 256}
kernels = [getattr(cbam, n) for n in dir(cbam) if n.startswith("_cbam_") and n.endswith("_kernel")]
kernels += [cosine_distill._cosine_distill_fwd_kernel, cosine_distill._cosine_distill_bwd_kernel]
for fn in kernels:
    consts = {k: v for k, v in (tiles if fn.__name__.startswith("_cbam") else rows).items() if k in fn.arg_names}
    signature = {a: "constexpr" if a in consts else pointer.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], fn.__name__
print(len(kernels), "compiled")
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    # no GPU here: catch what the interpreter allows but the compiler rejects (types, loop bounds, pointer casts)
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "8 compiled"
