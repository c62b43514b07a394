"""Faults a long run meets: the last K checkpoints kept, a newest checkpoint that does not load, losses that are
not finite (a step skipped, a streak of ``max_bad_steps`` stopping the run with its last good checkpoint intact)."""

from __future__ import annotations

import os

import pytest
import torch
from test_train import SMALL, losses

from askd.checkpoint import kept, load
from askd.config import Config
from askd.losses import build
from askd.train import Phase, Trainer, main, to_input
from askd.train import trainer as trainer_module

TEACHER = [*SMALL, "--phases", "teacher"]


def run_error(argv: list[str], capsys, status: int = 2) -> str:
    assert main(argv) == status
    return capsys.readouterr().err


def test_the_last_k_checkpoints_are_kept_and_the_newest_is_checkpoint_pt(tmp_path):
    out = tmp_path / "run"
    argv = [*TEACHER, "--out", str(out), "--set", "checkpoint_every=1", "--set", "keep_checkpoints=2"]
    assert main([*argv, "--set", "max_steps=4"]) == 0
    phase = out / "teacher"
    assert [p.name for p in kept(phase / "checkpoint.pt")] == ["checkpoint-00000004.pt", "checkpoint-00000003.pt"]
    assert os.path.samefile(phase / "checkpoint.pt", phase / "checkpoint-00000004.pt")  # a link, not a copy
    assert load(phase / "checkpoint.pt")["step"] == 4
    assert not list(phase.glob(".*.tmp"))


def test_resume_falls_back_to_an_older_checkpoint_when_the_newest_does_not_load(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TEACHER, "--out", str(out), "--set", "checkpoint_every=1", "--set", "keep_checkpoints=2"]
    assert main([*argv, "--set", "max_steps=2"]) == 0
    straight = losses(out, "teacher")
    phase = out / "teacher"
    for name in ("checkpoint.pt", "checkpoint-00000002.pt"):  # as a disk would leave them: garbage
        (phase / name).unlink()
        (phase / name).write_bytes(b"\0" * 100)
    assert main(["--out", str(out), "--resume", "--set", "max_steps=2"]) == 0
    captured = capsys.readouterr()
    assert f"cannot read checkpoint {phase / 'checkpoint.pt'}" in captured.err
    assert "trying the older checkpoint-00000002.pt" in captured.err
    assert f"resuming at step 1 of 2 from {phase / 'checkpoint-00000001.pt'}" in captured.out
    assert losses(out, "teacher") == straight  # step 2 again, the same


def test_a_resume_with_no_checkpoint_that_loads_names_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TEACHER, "--out", str(out), "--set", "max_steps=1"]) == 0
    (out / "teacher" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated zip")
    err = run_error(["--out", str(out), "--resume", "--set", "max_steps=2"], capsys)
    assert "no checkpoint loads: cannot read checkpoint" in err and str(out / "teacher" / "checkpoint.pt") in err


def nan_from(step: int, until: int | None = None):
    """A step_loss whose loss is NaN at the steps ``step`` to ``until`` (calls counted from 1)."""
    real, calls = trainer_module.step_loss, []

    def step_loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= step and (until is None or len(calls) <= until):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    return step_loss


def trainer(amp: str = "off") -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    cfg = Config(embedding_size=32, amp=amp)
    t = Trainer.create(cfg, Phase("teacher", build("base", cfg, 8), cfg.arch), 8, 10, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8, generator=g)
    hr = to_input(images, torch.device("cpu"), torch.zeros(4, dtype=torch.bool), False)
    return t, hr, torch.arange(4)


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_step_with_a_nan_loss_changes_no_weight(monkeypatch, amp):
    t, hr, labels = trainer(amp)
    if amp == "fp16":  # a scale the gradients fit in, so that the second step is not an overflow the scaler skips
        t.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    monkeypatch.setattr(trainer_module, "step_loss", nan_from(1, until=1))
    before = {k: v.clone() for k, v in t.model.state_dict().items() if v.is_floating_point()}
    scale = t.scaler.get_scale() if amp == "fp16" else None
    _, applied = t.train_step(hr, labels)
    assert not applied and t.step == 1
    after = t.model.state_dict()
    # BatchNorm's running statistics saw the batch (the forward ran); no weight moved
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "running" not in k)
    assert not t.opt.state  # no momentum buffer was started
    if amp == "fp16":
        assert t.scaler.get_scale() < scale  # the scaler backed off, as for an overflow
    _, applied = t.train_step(hr, labels)
    assert applied and not torch.equal(t.model.state_dict()["stem.0.weight"], before["stem.0.weight"])


def test_a_streak_of_nan_losses_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "step_loss", nan_from(3))
    argv = [*TEACHER, "--out", str(out), "--set", "checkpoint_every=1", "--set", "max_bad_steps=3"]
    assert main([*argv, "--set", "max_steps=10"]) == 3
    captured = capsys.readouterr()
    captured_err = captured.err
    assert captured.out.count("[teacher] step 3: loss or gradients not finite; step skipped") == 1
    assert "not finite for 3 steps in a row (steps 3-5, max_bad_steps 3)" in captured_err
    assert f"the last good checkpoint {out / 'teacher' / 'checkpoint.pt'} is kept" in captured_err
    ckpt = load(out / "teacher" / "checkpoint.pt")
    assert ckpt["step"] == 2  # none written during the streak
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # the run continues from it once the cause is gone
    monkeypatch.undo()
    assert main(["--out", str(out), "--resume", "--set", "max_steps=4"]) == 0
    assert load(out / "teacher" / "checkpoint.pt")["step"] == 4
