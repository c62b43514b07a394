"""The A-SKD loss over all 48 IR-50 maps (24 channel + 24 spatial), forward+backward: the eager loop (the
reference, as the authors' code runs it), torch.compile of it, and the fused ext and triton ops."""

from __future__ import annotations

import pytest
import torch

from askd.losses import attention_distill_loss

from .conftest import BATCH, DEVICE, IMPLS, STAGES, skip_reason, sync, warm_up

BLOCKS = [3, 4, 14, 3]  # IR-50 blocks per stage


def ir50_maps(requires_grad: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    maps = []
    for (C, H), n in zip(STAGES, BLOCKS, strict=True):
        for _ in range(n):
            pair = (torch.randn(BATCH, C, device=DEVICE), torch.randn(BATCH, 1, H, H, device=DEVICE))
            maps.append(tuple(m.requires_grad_(requires_grad) for m in pair))
    return maps


@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_distill(benchmark, impl):
    reason = skip_reason(impl)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"distill loss fwd+bwd B={BATCH} 48 IR-50 maps float32"
    teacher, student = ir50_maps(False), ir50_maps(True)
    flat = [m for pair in student for m in pair]
    name = "torch" if impl in ("eager", "compile") else impl

    def loss(t, s):
        return attention_distill_loss(t, s, "official", 5.0, backend=name)

    fn = torch.compile(loss) if impl == "compile" else loss

    def run():
        torch.autograd.grad(fn(teacher, student), flat)
        sync()

    warm_up(benchmark, run)
    benchmark.pedantic(run, rounds=50 if DEVICE == "cpu" else 200, warmup_rounds=1)
