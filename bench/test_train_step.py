"""One whole A-SKD training step, in images per second: teacher forward (frozen, HR) + LR synthesis + student
forward/backward (ArcFace + distillation) + SGD step, as ``askd.train`` runs it.

Set-ups, all on the same model, batch and data:
- ``eager``: the authors' way, fp32, NCHW, the plain PyTorch modules;
- ``eager_amp_cl``: autocast and channels_last (autocast bf16 where the device has native bf16, else float32:
  see ``conftest.amp_dtype``);
- ``compile``: torch.compile of the ``eager_amp_cl`` models;
- ``fused``: ``eager`` with backend ``auto`` for every CBAM and the loss (exactly ``askd.train --fused``);
- ``fused_amp_cl``: ``eager_amp_cl`` with backend ``auto``;
- ``fused_compile``: ``fused_amp_cl`` under torch.compile.
CPU: ``ir_tiny_cbam`` (the demo model) at B=64; GPU: ``ir50_cbam`` at B=128.

Between the timed rounds of every set-up, one untimed-by-pytest ``eager`` step runs and is timed on its own
(``extra_info["eager_between_s"]``, its median): the report's "interleaved" ratios divide by that, so a
machine that slows down between one set-up's rounds and the next (a shared CPU) does not pass for a
speed-up. After the timing, one more step runs under torch.profiler: its peak memory and its top ops go
into extra_info too (the report's "where the time goes" tables).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from askd import models
from askd.data import degrade
from askd.losses import attention_distill_loss
from askd.nn import ArcFace
from askd.train import compile_model

from .conftest import DEVICE, amp_dtype, profile_call, sync, warm_up

# set-up -> (fused kernels, autocast + channels_last, torch.compile)
SETUPS = {
    "eager": (False, False, False),
    "eager_amp_cl": (False, True, False),
    "compile": (False, True, True),
    "fused": (True, False, False),
    "fused_amp_cl": (True, True, False),
    "fused_compile": (True, True, True),
}
ARCH, BATCH = ("ir50_cbam", 128) if DEVICE == "cuda" else ("ir_tiny_cbam", 64)
CLASSES = 1000 if DEVICE == "cuda" else 100
AMP = amp_dtype()


def build(setup: str):
    """(teacher, student, head, optimiser, step options) for one set-up."""
    fused, channels_last, compiled = SETUPS[setup]
    backend = "auto" if fused else "torch"
    teacher = models.create(ARCH, backend=backend).to(DEVICE).eval().requires_grad_(False)
    student = models.create(ARCH, backend=backend).to(DEVICE)
    head = ArcFace(512, CLASSES).to(DEVICE)
    if channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    params = [*student.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fwd_t, fwd_s = teacher, student
    if compiled:
        fwd_t, fwd_s = compile_model(teacher, torch.device(DEVICE)), compile_model(student, torch.device(DEVICE))
    return fwd_t, fwd_s, head, opt, {"amp": AMP if channels_last else None, "cl": channels_last, "backend": backend}


def make_step(setup: str):
    teacher, student, head, opt, o = build(setup)
    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1).to(DEVICE)
    if o["cl"]:
        hr = hr.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g).to(DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=o["amp"], enabled=o["amp"] is not None):
            lr = degrade(hr, 14)
            with torch.no_grad():
                _, t_maps = teacher(hr)
            emb, s_maps = student(lr)
            distill = attention_distill_loss(t_maps, s_maps, backend=o["backend"])
        loss = F.cross_entropy(head(emb.float(), labels), labels) + distill
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


@pytest.fixture(scope="module")
def eager_step():
    """The reference step that runs between every set-up's rounds (warmed up here, once)."""
    step = make_step("eager")
    step()
    return step


@pytest.mark.parametrize("setup", SETUPS)
def test_train_step(benchmark, setup, eager_step):
    amp = str(AMP).removeprefix("torch.") if AMP else "off"
    benchmark.group = f"train step B={BATCH} {ARCH} (amp set-ups: autocast {amp}, channels_last)"
    benchmark.extra_info["images_per_step"] = BATCH
    step = make_step(setup)
    warm_up(benchmark, step)
    between = []

    def eager_between_rounds():
        start = time.perf_counter()
        eager_step()
        between.append(time.perf_counter() - start)

    benchmark.pedantic(step, setup=eager_between_rounds, rounds=10 if DEVICE == "cpu" else 30, warmup_rounds=1)
    benchmark.extra_info["eager_between_s"] = statistics.median(between)
    benchmark.extra_info.update(profile_call(step))
