"""The LR synthesis (``askd.data.degrade``) of a training batch, both variants at 8x (14 px): eager against
torch.compile of it. It has no fused kernel; this says what it costs next to the rest of a step."""

from __future__ import annotations

import pytest
import torch

from askd.data import degrade

from .conftest import BATCH, DEVICE, sync, warm_up

IMPLS = ("eager", "compile")


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("impl", IMPLS)
def test_degrade(benchmark, impl, variant):
    benchmark.group = f"degrade {variant} B={BATCH} 112 -> 14 px float32 channels_last"
    x = (torch.rand(BATCH, 3, 112, 112, device=DEVICE) * 2 - 1).contiguous(memory_format=torch.channels_last)
    fn = torch.compile(degrade) if impl == "compile" else degrade

    def run():
        fn(x, 14, variant)
        sync()

    warm_up(benchmark, run)
    benchmark.pedantic(run, rounds=20 if DEVICE == "cpu" else 100, warmup_rounds=1)
