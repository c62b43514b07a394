"""The CPU workaround for oneDNN's strided 1x1 convolution (torch 2.13): exact, and no crash in any backbone.

oneDNN's backward of a stride-2 1x1 convolution on channels_last input corrupts the heap on AVX-512 CPUs
(bf16 without AMX, e.g. AMD Zen 4: ``jit_bf16_1x1`` weights gradient; float32 on Sapphire Rapids:
``brgconv_strided`` data gradient). ``askd.nn.iresnet.PointwiseConv`` runs that convolution as a subsample
and a stride-1 1x1 convolution on CPUs. A crash kills the process, so every backbone and the plain
reproduction run in subprocesses, once with oneDNN's own choice of kernels and once for each AVX-512 level
below it that this CPU has (``ONEDNN_MAX_CPU_ISA``), which is how one machine tests the others' kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from askd import backend, models
from askd.nn.iresnet import PointwiseConv

CAPABILITY = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", ...
CPUINFO = Path("/proc/cpuinfo")
FLAGS = CPUINFO.read_text() if CPUINFO.exists() else ""
# oneDNN ISA caps below this CPU's own level: AVX-512 with bf16 but no AMX (Zen 4, Cooper Lake) where the CPU
# has AMX, and plain AVX-512 (Skylake) where it has more; a cap at the CPU's own level would repeat "native"
CAPS = [cap for cap, flag in (("AVX512_CORE_BF16", "amx_bf16"), ("AVX512_CORE", "avx512_vnni")) if flag in FLAGS]
ISAS = ["native", *CAPS]
CASES = [("native", "fp32")] + [(isa, "bf16") for isa in ISAS]  # float32 runs avx512_core kernels at each level

# The reproduction, plain PyTorch: Conv2d(8, 8, 1, stride=2), channels_last (8,8,112,112), backward.
REPRODUCTION = """
import sys, torch
conv = {conv}.to(memory_format=torch.channels_last)
x = torch.randn(8, 8, 112, 112).contiguous(memory_format=torch.channels_last).requires_grad_()
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sys.argv[1] == "bf16"):
    y = conv(x)
y.float().sum().backward()
print("survived")
"""

# Forward and backward of every backbone in channels_last, bf16 autocast or float32, through the reference
# CBAM and through the fused kernels; prints each case before it runs, so a crash names it.
BACKBONES = """
import sys, torch
from askd import models
amp, backends = sys.argv[1] == "bf16", sys.argv[2].split(",")
for name in models.names():
    for backend in backends:
        print("running", name, backend, flush=True)
        torch.manual_seed(0)
        classes = {"num_classes": 10} if models.task_of(name) == "classify" else {}  # ResNets: strided shortcuts
        net = models.create(name, backend=backend, **classes).to(memory_format=torch.channels_last)
        b = 8 if name == "ir_tiny_cbam" else 2
        x = torch.randn(b, 3, 112, 112).contiguous(memory_format=torch.channels_last).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            emb, maps = net(x)
            loss = emb.float().square().mean() + sum(c.float().mean() + s.float().mean() for c, s in maps)
        loss.backward()
        assert torch.isfinite(x.grad).all(), (name, backend)
print("survived")
"""


def run_python(code: str, *args: str, isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def crashed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode != 0 or "survived" not in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (2, 5, 13, 11), (3, 8, 16, 16)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_pointwise_conv_equals_the_strided_conv(dtype, shape, layout):
    """Output and both gradients equal ``F.conv2d(x, w, stride=2)``, computed in float64 (oneDNN-free)."""
    torch.manual_seed(0)
    conv = PointwiseConv(shape[1], 6, 2).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2, dtype=dtype)[..., ::2]
    x.requires_grad_()
    y = conv(x)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, conv.weight), g)

    x64 = x.detach().double().requires_grad_()
    w64 = conv.weight.detach().double().requires_grad_()
    want = F.conv2d(x64, w64, stride=2)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), g.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert y.shape == want.shape == (shape[0], 6, (shape[2] + 1) // 2, (shape[3] + 1) // 2)
    torch.testing.assert_close(y.double(), want, **tol)
    torch.testing.assert_close(dx.double(), want_dx, **tol)
    torch.testing.assert_close(dw.double(), want_dw, **tol)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_pointwise_conv_keeps_the_conv2d_state_dict_and_stride_one():
    conv = PointwiseConv(4, 8, 2)
    assert isinstance(conv, torch.nn.Conv2d) and conv.stride == (2, 2) and conv.bias is None
    assert list(conv.state_dict()) == ["weight"] and conv.weight.shape == (8, 4, 1, 1)
    same = PointwiseConv(4, 8, 1)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(same(x), F.conv2d(x, same.weight))
    names = [k for k in models.create("ir_tiny_cbam").state_dict() if "shortcut.0" in k]
    assert names == [f"blocks.{i}.shortcut.0.weight" for i in range(4)]  # checkpoints keep loading


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("amp", ["bf16", "fp32"])
def test_the_reproduction_survives_through_pointwise_conv(isa, amp):
    """The issue's exact reproduction with our convolution survives on every ISA; the plain one is reported."""
    ours_code = "from askd.nn.iresnet import PointwiseConv\n" + REPRODUCTION.format(conv="PointwiseConv(8, 8, 2)")
    ours = run_python(ours_code, amp, isa=isa)
    plain = run_python(REPRODUCTION.format(conv="torch.nn.Conv2d(8, 8, 1, stride=2, bias=False)"), amp, isa=isa)
    note = f"plain nn.Conv2d on {isa}/{amp}: " + ("crashed (oneDNN bug present)" if crashed(plain) else "survived")
    assert not crashed(ours), f"{note}; PointwiseConv crashed too: rc {ours.returncode}\n{ours.stderr[-2000:]}"


@pytest.mark.skipif(CAPABILITY != "AVX512" and not CAPS,
                    reason=f"this CPU ({CAPABILITY}) runs none of oneDNN's AVX-512 kernels, where the bug lives")
@pytest.mark.parametrize(("isa", "amp"), CASES)
def test_every_backbone_trains_in_channels_last(isa, amp):
    """Forward and backward of every architecture, channels_last, reference and fused CBAM, in a subprocess."""
    fused = "ext" if backend.availability("cpu")["ext"] is None else None
    proc = run_python(BACKBONES, amp, ",".join(["torch", *([fused] if fused else [])]), isa=isa)
    last = [line for line in proc.stdout.splitlines() if line.startswith("running")][-1:]
    assert not crashed(proc), f"{last} crashed on {isa}/{amp}: rc {proc.returncode}\n{proc.stderr[-2000:]}"
