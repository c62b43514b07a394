"""``python -m askd.train`` on the CPU: a few steps that train, checkpoint, resume exactly, and fail clearly
without writing anything; run folders: one run at a time, a finished run kept."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from askd import hostmem, models, runlock
from askd.checkpoint import load, save_atomic
from askd.config import Config
from askd.train import main, teacher_forward

# a small synthetic run: 8 identities x 4 images, batches of 8, 16 held-out images
SMALL = [
    "--batch-size", "8",
    "--set", "synthetic_identities=8", "--set", "synthetic_samples=4",
    "--set", "eval_identities=4", "--set", "eval_samples=4", "--set", "eval_pairs=40",
    "--set", "log_every=1", "--set", "embedding_size=32",
]


def losses(run_dir, phase):
    rows = [json.loads(line) for line in (run_dir / phase / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def test_two_steps_train_checkpoint_and_resume_to_the_same_loss(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = [*SMALL, "--phases", "teacher"]
    assert main([*argv, "--out", str(straight), "--set", "max_steps=3"]) == 0
    assert main([*argv, "--out", str(resumed), "--set", "max_steps=2"]) == 0
    # as if the run had logged step 3 and died before its next checkpoint
    log = resumed / "teacher" / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"phase": "teacher", "step": 3, "loss": -1.0}) + "\n")
    # the resume names only the run folder: the rest comes from its config.toml
    assert main(["--out", str(resumed), "--set", "max_steps=3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 once, from the resumed run

    full, cut = losses(straight, "teacher"), losses(resumed, "teacher")
    assert all(torch.isfinite(torch.tensor(v)) for v in full.values())
    assert cut[3] == full[3]  # the step after the resume sees the same batch, flips, dropout and weights

    ckpt = load(straight / "teacher" / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["role"] == "teacher" and ckpt["config"]["max_steps"] == 3
    assert {"model", "head", "optimizer", "scheduler", "scaler", "rng", "epoch"} <= ckpt.keys()
    torch.manual_seed(0)
    fresh = models.create("ir_tiny_cbam", embedding_size=32).state_dict()
    changed = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert "stem.0.weight" in changed and "head.3.weight" in changed
    assert not list((straight / "teacher").glob("*.tmp"))  # atomic writes leave no temp files
    assert (straight / "config.toml").read_text().count("max_steps = 3") == 1


def test_resume_of_a_run_folder_of_an_older_version(tmp_path):
    """Before the renames, config.toml had the keys stage and lr_size and metrics.jsonl lines named a "stage"."""
    out = tmp_path / "old"
    assert main([*SMALL, "--phases", "teacher", "--out", str(out), "--set", "max_steps=2"]) == 0
    config, log = out / "config.toml", out / "teacher" / "metrics.jsonl"
    config.write_text(config.read_text().replace("\nphases =", "\nstage =").replace("\nlow_res_size =", "\nlr_size ="))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    old = [{("stage" if k == "phase" else k): v for k, v in row.items()} for row in rows]
    old.append({"stage": "teacher", "step": 3, "loss": -1.0})  # logged after the last checkpoint
    log.write_text("".join(json.dumps(row) + "\n" for row in old))
    with pytest.warns(DeprecationWarning) as caught:
        assert main(["--out", str(out), "--set", "max_steps=3", "--resume"]) == 0
    assert [str(w.message) for w in caught if "config key" in str(w.message)] == [
        f"{config}: config key 'stage' is deprecated; use 'phases'",
        f"{config}: config key 'lr_size' is deprecated; use 'low_res_size'",
    ]
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert resumed[:2] == rows and [row["step"] for row in resumed] == [1, 2, 3]
    assert all(row["phase"] == "teacher" and "stage" not in row for row in resumed)
    assert "\nphases = " in config.read_text() and "\nstage =" not in config.read_text()


def test_students_against_a_reused_teacher_and_results(tmp_path):
    teacher_run = tmp_path / "t"
    assert main([*SMALL, "--phases", "teacher", "--out", str(teacher_run), "--set", "max_steps=2"]) == 0
    out = tmp_path / "s"
    argv = [*SMALL, "--phases", "student", "--method", "base,askd_kd", "--out", str(out), "--set", "max_steps=2",
            "--teacher", str(teacher_run / "teacher" / "checkpoint.pt")]
    assert main(argv) == 0
    # the alias askd_kd is the composition askd+kd: its folder, term names and table row say so
    terms = [json.loads(line) for line in (out / "student_askd+kd" / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "askd", "kd", "loss"} <= terms[-1].keys()
    assert terms[-1]["loss"] == pytest.approx(terms[-1]["ce"] + terms[-1]["askd"] + terms[-1]["kd"], rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert list(results["verification"]) == ["held-out"] and results["pairs"] == {"held-out": 40}
    names = set(results["verification"]["held-out"])
    assert names == {"teacher (HR)", "teacher (LR)", "student base (LR)", "student askd+kd (LR)"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["verification"]["held-out"].values())
    assert len(results["attention_correlation"]["askd+kd"]) == 4
    assert "| student askd+kd (LR) |" in (out / "results.md").read_text()


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err  # may also hold the progress bar
    assert "askd.train: error: " in err and "Traceback" not in err
    return err


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert str(missing) in run_error(["--data", str(missing), "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()  # bad input is found before the run folder is made


def test_unknown_arch(tmp_path, capsys):
    err = run_error(["--arch", "typo", "--out", str(tmp_path / "o")], capsys)
    assert "'arch': got 'typo'" in err and "ir_tiny_cbam" in err
    assert not (tmp_path / "o").exists()


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "faces" / "alice").mkdir(parents=True)
    assert "no images found" in run_error(["--data", str(tmp_path / "faces"), "--out", str(tmp_path / "o")], capsys)


def test_too_few_identities_in_a_folder(tmp_path, capsys):
    for person in ("a", "b", "c"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        Image.new("L", (92, 112), 128).save(tmp_path / "faces" / person / "1.pgm")
    err = run_error(["--data", str(tmp_path / "faces"), "--out", str(tmp_path / "o")], capsys)
    assert "has 3 identity folders" in err


def test_wrong_scale(tmp_path, capsys):
    assert "'scale': got 3" in run_error(["--scale", "3", "--out", str(tmp_path / "o")], capsys)


def test_teacher_of_another_architecture(tmp_path, capsys):
    fake = tmp_path / "teacher.pt"
    save_atomic({"model": {}, "head": {}, "arch": "ir18_cbam", "variant": "official", "embedding_size": 512,
                 "num_classes": 10}, fake)
    err = run_error([*SMALL, "--phases", "student", "--teacher", str(fake), "--out", str(tmp_path / "o")], capsys)
    assert "ir18_cbam" in err and "ir_tiny_cbam" in err
    assert not (tmp_path / "o").exists()


def test_corrupt_and_missing_teacher(tmp_path, capsys):
    corrupt = tmp_path / "teacher.pt"
    corrupt.write_bytes(b"not a checkpoint")
    err = run_error([*SMALL, "--phases", "student", "--teacher", str(corrupt), "--out", str(tmp_path / "o")], capsys)
    assert "cannot read checkpoint" in err and str(corrupt) in err
    err = run_error([*SMALL, "--phases", "student", "--out", str(tmp_path / "o2")], capsys)
    assert "needs a teacher" in err


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_and_channels_last_steps_stay_finite(tmp_path, amp):
    fast = [*SMALL, "--amp", amp, "--channels-last", "--out", str(tmp_path)]
    assert main([*fast, "--phases", "teacher", "--set", "max_steps=1"]) == 0
    teacher = str(tmp_path / "teacher" / "checkpoint.pt")
    # students into the teacher's own run folder continue that run: --resume
    student = ["--phases", "student", "--method", "askd", "--teacher", teacher, "--set", "max_steps=2", "--resume"]
    assert main([*fast, *student]) == 0
    rows = losses(tmp_path, "student_askd")
    assert set(rows) == {1, 2} and all(torch.isfinite(torch.tensor(v)) for v in rows.values())


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(tmp_path, capsys, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or "malloc keeps freed memory (test)")
    argv = [*SMALL, "--phases", "teacher", "--set", "max_steps=1", "--set", f"keep_freed_memory={str(keep).lower()}"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert len(calls) == keep
    assert ("askd: malloc keeps freed memory (test)" in capsys.readouterr().out) == keep


def test_corrupt_image_while_training(tmp_path, capsys):
    for person in "abcdef":
        (tmp_path / "faces" / person).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (92, 112), 40 * i).save(tmp_path / "faces" / person / f"{i}.pgm")
    bad = tmp_path / "faces" / "a" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = run_error(["--data", str(tmp_path / "faces"), "--batch-size", "2", "--out", str(tmp_path / "o")], capsys)
    assert "cannot read image" in err and str(bad) in err


def test_a_finished_run_is_not_replaced(tmp_path, capsys):
    run_a = tmp_path / "runA"
    assert main([*SMALL, "--phases", "teacher", "--out", str(run_a), "--set", "max_steps=1"]) == 0
    config, ckpt = (run_a / "config.toml").read_text(), (run_a / "teacher" / "checkpoint.pt").read_bytes()
    assert "'arch': got 'typo'" in run_error(["--arch", "typo", "--out", str(run_a)], capsys)
    err = run_error([*SMALL, "--phases", "teacher", "--out", str(run_a)], capsys)
    assert f"run folder {run_a} holds checkpoints of an earlier run (teacher/checkpoint.pt)" in err
    assert "use --resume to continue it" in err and "another --out" in err
    assert (run_a / "config.toml").read_text() == config
    assert (run_a / "teacher" / "checkpoint.pt").read_bytes() == ckpt


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = run_error(["--out", str(missing), "--resume"], capsys)
    assert f"nothing to resume in {missing}: no config.toml or checkpoint; drop --resume" in err
    assert not missing.exists()
    missing.mkdir()
    assert "nothing to resume" in run_error(["--out", str(missing), "--resume"], capsys)
    assert list(missing.iterdir()) == []


# holds the run folder's lock until its stdin closes
HOLDER = """import sys
from askd.runlock import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_one_run_at_a_time_per_folder(tmp_path, capsys):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        err = run_error([*SMALL, "--phases", "teacher", "--out", str(out), "--set", "max_steps=1"], capsys)
        assert f"run folder {out} is in use by another run (pid {holder.pid})" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # dies holding the lock: flock releases it
        holder.wait()
    with runlock.hold(out) as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
    assert lock.read_text() == ""


def test_compile_compiles_the_frozen_teacher_too():
    """--compile runs the students' teacher through torch.compile as well (measured: bench/test_train_step.py);
    fold_teacher=false keeps the module as loaded (its folded copy: tests/test_fold.py)."""
    teacher = models.create("ir_tiny_cbam", embedding_size=32)
    assert teacher_forward(Config(fold_teacher=False), teacher) is teacher
    compiled = teacher_forward(Config(compile=True, fold_teacher=False), teacher)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is teacher
    assert isinstance(teacher_forward(Config(compile=True), teacher), torch._dynamo.eval_frame.OptimizedModule)
