"""CBAM forward and forward+backward per IR-50 stage shape: eager module, torch.compile of it, ext, triton.

Each group is one stage shape and mode; inputs are channels_last. Forward runs under no_grad; forward+backward
takes the gradients of x and every weight with torch.autograd.grad (nothing accumulates between rounds).
"""

from __future__ import annotations

import pytest
import torch

from askd.nn import CBAM

from .conftest import BATCH, DEVICE, DTYPE, IMPLS, STAGES, skip_reason, sync, warm_up
from .roofs import cbam_bytes


def make(impl: str, channels: int) -> torch.nn.Module:
    module = CBAM(channels, backend="torch" if impl in ("eager", "compile") else impl).to(DEVICE)
    return torch.compile(module) if impl == "compile" else module


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"C{s[0]}xH{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_cbam(benchmark, impl, stage, mode):
    reason = skip_reason(impl)
    if reason:
        pytest.skip(reason)
    C, H = stage
    benchmark.group = f"cbam {mode} B={BATCH} C={C} H=W={H} {DTYPE} channels_last"
    module = make(impl, C)
    x = torch.randn(BATCH, C, H, H, device=DEVICE).to(DTYPE).contiguous(memory_format=torch.channels_last)
    params = list(module.parameters())
    benchmark.extra_info["bytes"] = cbam_bytes(BATCH, C, H, x.element_size(), backward=mode == "fwd+bwd")
    autocast = torch.autocast(DEVICE, dtype=DTYPE, enabled=DTYPE != torch.float32)

    if mode == "fwd":

        def run():
            with torch.no_grad(), autocast:
                module(x)
            sync()
    else:
        x.requires_grad_()
        with autocast:
            outs = module(x)
        grads = [torch.randn_like(o) for o in outs]

        def run():
            with autocast:
                outs = module(x)
            torch.autograd.grad(outs, [x, *params], grads)
            sync()

    warm_up(benchmark, run)
    benchmark.pedantic(run, rounds=20 if DEVICE == "cpu" else 100, warmup_rounds=1)
