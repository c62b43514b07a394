"""One whole A-SKD training step, in images per second: teacher forward (frozen, HR) + LR synthesis + student
forward/backward (ArcFace + distillation) + SGD step, as ``askd.train`` runs it.

Set-ups, all on the same model, batch and data:
- ``eager``: the authors' way, fp32, NCHW, the plain PyTorch modules;
- ``eager_amp_cl``: autocast (bf16) and channels_last;
- ``compile``: torch.compile of the ``eager_amp_cl`` models;
- ``fused``: ``eager`` with backend ``auto`` for every CBAM and the loss (exactly ``askd.train --fused``);
- ``fused_amp_cl``: ``eager_amp_cl`` with backend ``auto``;
- ``fused_compile``: ``fused_amp_cl`` under torch.compile.
CPU: ``ir_tiny_cbam`` (the demo model) at B=64; GPU: ``ir50_cbam`` at B=128.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from askd import models
from askd.data import degrade
from askd.losses import attention_distill_loss
from askd.nn import ArcFace
from askd.train import compile_model

from .conftest import DEVICE, sync, warm_up

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
    return fwd_t, fwd_s, head, opt, {"amp": channels_last, "cl": channels_last, "backend": backend}


def make_step(setup: str):
    teacher, student, head, opt, o = build(setup)
    g = torch.Generator().manual_seed(0)
    hr = (torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1).to(DEVICE)
    if o["cl"]:
        hr = hr.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g).to(DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=o["amp"]):
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


@pytest.mark.parametrize("setup", SETUPS)
def test_train_step(benchmark, setup):
    benchmark.group = f"train step B={BATCH} {ARCH} images/s = {BATCH} / time"
    benchmark.extra_info["images_per_step"] = BATCH
    step = make_step(setup)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_up(benchmark, step)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 30, warmup_rounds=1)
