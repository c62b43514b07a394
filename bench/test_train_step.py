"""One whole A-SKD training step, in images per second: ``askd.train``'s own ``Trainer.train_step`` (LR
synthesis + frozen teacher forward on HR + student forward/backward with ArcFace and the A-SKD loss + SGD and
schedule step), with the models built as ``askd.train`` builds them and the uint8 batch's conversion
(``to_input``) included, as the training loop runs it.

Set-ups, all on the same model, batch and data, each named by the ``askd.train`` flags it stands for:
- ``eager``: the authors' way, fp32, NCHW, the plain PyTorch modules (no flags);
- ``eager_amp_cl``: ``--amp bf16 --channels-last`` where the device has native bf16, else ``--channels-last``
  alone (see ``conftest.amp_dtype``);
- ``compile``: ``eager_amp_cl`` + ``--compile`` (the student and the frozen teacher compiled, as the CLI);
- ``fused``: ``--fused`` (backend ``auto`` for every CBAM and the loss);
- ``fused_amp_cl``: ``eager_amp_cl`` + ``--fused``;
- ``fused_compile``: ``fused_amp_cl`` + ``--compile``;
- ``fused_compile_student_only``: ``fused_compile`` with the frozen teacher left uncompiled (still folded),
  which the CLI does not do; kept as the measurement behind that choice (``askd.train.teacher_forward``);
- ``fused_unfolded_teacher``: ``fused`` with ``--set fold_teacher=false`` (the teacher's BatchNorms run as
  they are): the measurement behind folding them.
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
from dataclasses import replace

import pytest
import torch

from askd.config import Config
from askd.losses import build
from askd.train import Phase, Trainer, build_model, freeze, random_flips, teacher_forward, to_input

from .conftest import DEVICE, amp_dtype, profile_call, sync, warm_up
from .roofs import step_flops

# set-up -> (--fused, --amp + --channels-last, --compile, the teacher: "train" as askd.train runs it (folded,
# compiled with --compile), "uncompiled" folded only, "unfolded" compiled with --compile but not folded)
SETUPS = {
    "eager": (False, False, False, "train"),
    "eager_amp_cl": (False, True, False, "train"),
    "compile": (False, True, True, "train"),
    "fused": (True, False, False, "train"),
    "fused_unfolded_teacher": (True, False, False, "unfolded"),
    "fused_amp_cl": (True, True, False, "train"),
    "fused_compile": (True, True, True, "train"),
    "fused_compile_student_only": (True, True, True, "uncompiled"),
}
ARCH, BATCH = ("ir50_cbam", 128) if DEVICE == "cuda" else ("ir_tiny_cbam", 64)
CLASSES = 1000 if DEVICE == "cuda" else 100
AMP = amp_dtype()
STEP_FLOPS = step_flops(ARCH, BATCH, CLASSES)


def config(setup: str, arch: str = ARCH, batch: int = BATCH, device: str = DEVICE) -> Config:
    """The ``askd.train`` config of one set-up: an A-SKD student at 8x (LR 14 px), the official variant."""
    fused, amp_cl, compiled, _ = SETUPS[setup]
    amp = "bf16" if amp_cl and AMP == torch.bfloat16 else "off"
    return Config(arch=arch, batch_size=batch, method="askd", device=device, fused=fused, amp=amp,
                  channels_last=amp_cl, compile=compiled)


def make_step(setup: str, arch: str = ARCH, batch: int = BATCH, classes: int = CLASSES, device: str = DEVICE):
    """One training step of ``setup`` as ``askd.train``'s loop runs it, as a callable without arguments."""
    cfg, dev = config(setup, arch, batch, device), torch.device(device)
    teacher, teacher_head = freeze(*build_model(cfg, arch, classes, dev))
    how = SETUPS[setup][3]
    teacher = teacher_forward(replace(cfg, compile=cfg.compile and how != "uncompiled",
                                      fold_teacher=how != "unfolded"), teacher)
    phase = Phase("student", build("askd", cfg, classes), arch, teacher, teacher_head)
    trainer = Trainer.create(cfg, phase, classes, 1000, dev)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g).to(dev)

    def step():
        hr = to_input(images, dev, random_flips(batch, cfg.seed, trainer.step), cfg.channels_last)
        trainer.train_step(hr, labels)
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
    benchmark.extra_info["flops"] = STEP_FLOPS["total"]  # counted on the meta device (bench.roofs.step_flops)
    benchmark.extra_info["dtype"] = str(AMP).removeprefix("torch.") if AMP and SETUPS[setup][1] else "float32"
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
