"""``python -m askd.experiment`` on the CPU: a tiny grid end to end (runs, tables, chart), an interrupted grid
continued without training anything twice, the table's arithmetic, TensorBoard optional, bad grids refused."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_train import SMALL

from askd import experiment
from askd.train import tasks

ONE_STEP = [*SMALL, "--set", "max_steps=1"]


def test_a_tiny_grid_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the tensorboard package
    out = tmp_path / "grid"
    argv = [*ONE_STEP, "--method", "base,askd", "--scale", "4,8", "--seeds", "2", "--out", str(out)]
    assert experiment.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tensorboard is not installed" in printed and not list(out.glob("*/tb"))
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["scale4_seed0", "scale4_seed1", "scale8_seed0", "scale8_seed1", "seed0", "seed1"]
    assert all(f"{name}: " in printed for name in runs)  # a line per finished run
    # each seed's teacher is trained once, in seed{k}/; its cells distil their students from it
    cell = out / "scale8_seed1"
    assert not (cell / "teacher").exists() and (cell / "student_askd" / "checkpoint.pt").is_file()
    assert f'teacher = "{out / "seed1" / "teacher" / "checkpoint.pt"}"' in (cell / "config.toml").read_text()
    assert "seed = 1" in (cell / "config.toml").read_text() and "scale = 8" in (cell / "config.toml").read_text()

    table = json.loads((out / "table.json").read_text())
    rows = [(row["scale"], row["model"]) for row in table["accuracy"]]
    assert rows == [(None, "teacher (HR)")] + [
        (s, m) for s in (4, 8) for m in ("teacher (LR)", "student base (LR)", "student askd (LR)")
    ]
    cells = [json.loads((out / f"scale8_seed{k}" / "results.json").read_text()) for k in (0, 1)]
    accs = [c["verification"]["held-out"]["student askd (LR)"]["accuracy"] for c in cells]
    assert table["accuracy"][-1]["accuracy"]["held-out"]["values"] == accs and table["seeds"] == [0, 1]
    assert [(row["scale"], row["method"]) for row in table["correlation"]] == [(4, "base"), (4, "askd"),
                                                                               (8, "base"), (8, "askd")]
    assert "| 8x (14 px) | student askd (LR) |" in (out / "table.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_students_of_other_settings_distil_from_an_earlier_experiments_teachers(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert experiment.main([*ONE_STEP, "--method", "base", "--scale", "8", "--seeds", "2", "--out", str(first)]) == 0
    argv = [*ONE_STEP, "--method", "askd", "--set", "distill_weight=20", "--scale", "8", "--seeds", "2"]
    assert experiment.main([*argv, "--teachers", str(first), "--out", str(second)]) == 0
    assert sorted(p.name for p in second.iterdir() if p.is_dir()) == ["scale8_seed0", "scale8_seed1"]  # no teachers
    for k in (0, 1):
        teacher = first / f"seed{k}" / "teacher" / "checkpoint.pt"
        assert f'teacher = "{teacher}"' in (second / f"scale8_seed{k}" / "config.toml").read_text()
    # the same teacher, so the same teacher rows as the first experiment's cells
    a, b = (json.loads((d / "scale8_seed1" / "results.json").read_text())["verification"]["held-out"]
            for d in (first, second))
    assert a["teacher (LR)"] == b["teacher (LR)"] and "student askd (LR)" in b


class FakeWriter:
    """SummaryWriter's interface as write_events uses it; records what it is given."""

    made: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def _raise(error):
    raise error


def test_an_interrupted_grid_continues_without_training_twice(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    argv = [*ONE_STEP, "--method", "base", "--scale", "4,8", "--out", str(out)]
    real_run = experiment.run

    def interrupted(cfg):
        if Path(cfg.out).name == "scale8_seed0":  # its student trains, then Ctrl-C before the evaluation
            interrupt = dataclasses.replace(tasks.TASKS["face"], evaluate=lambda *a, **k: _raise(KeyboardInterrupt))
            monkeypatch.setitem(tasks.TASKS, "face", interrupt)
        return real_run(cfg)

    monkeypatch.setattr(experiment, "run", interrupted)
    assert experiment.main(argv) == 130
    cut = out / "scale8_seed0"
    assert (cut / "student_base" / "checkpoint.pt").is_file() and not (cut / "results.json").exists()
    assert not (out / "table.md").exists()
    monkeypatch.undo()

    stamps = {p: p.stat().st_mtime_ns for name in ("checkpoint.pt", "results.json") for p in out.rglob(name)}
    assert len(stamps) == 5  # two checkpoints and a results.json for seed0/ and scale4_seed0/, one in scale8_seed0/
    monkeypatch.setattr(experiment, "tensorboard_writer", lambda: FakeWriter)
    FakeWriter.made = []
    capsys.readouterr()
    assert experiment.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained or evaluated again
    assert (cut / "results.json").is_file() and (out / "table.md").is_file()
    printed = capsys.readouterr().out
    assert "seed0: finished earlier, kept" in printed and "scale4_seed0: finished earlier, kept" in printed
    assert "[student_base] already trained (1 steps)" in printed and "resumed)" in printed
    # event files for every run, kept ones too, from their metrics.jsonl
    assert sorted(w.log_dir for w in FakeWriter.made) == [str(out / n / "tb") for n in ("scale4_seed0", "scale8_seed0",
                                                                                        "seed0")]
    assert all(w.closed for w in FakeWriter.made)
    assert {"teacher/loss", "teacher/lr", "teacher/acc"} <= {tag for tag, _, _ in FakeWriter.made[0].scalars}


def test_event_files_from_metrics(tmp_path):
    rows = [{"phase": "student_askd", "step": 1, "epoch": 0, "lr": 0.1, "img_per_s": 50.0, "ce": 2.0, "askd": 0.5,
             "loss": 2.5, "acc": 0.25}, {"phase": "student_askd", "step": 2, "eval": {"held-out": 0.6}}]
    (tmp_path / "student_askd").mkdir()
    (tmp_path / "student_askd" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    FakeWriter.made = []
    experiment.write_events(tmp_path, FakeWriter)
    (w,) = FakeWriter.made
    assert w.log_dir == str(tmp_path / "tb") and w.closed
    assert sorted(w.scalars) == sorted([
        ("student_askd/lr", 0.1, 1), ("student_askd/img_per_s", 50.0, 1), ("student_askd/ce", 2.0, 1),
        ("student_askd/askd", 0.5, 1), ("student_askd/loss", 2.5, 1), ("student_askd/acc", 0.25, 1),
        ("student_askd/eval/held-out", 0.6, 2),
    ])


def results(size: int, hr: float, lr: float, student: float, spatial: list, channel: list) -> dict:
    """A results.json of one cell: sets a and b (b = a + 0.01), one student askd with two blocks."""
    def models(shift):
        accs = {"teacher (HR)": hr, "teacher (LR)": lr, "student askd (LR)": student}
        return {model: {"accuracy": acc + shift, "std": 0.0} for model, acc in accs.items()}

    pairs = enumerate(zip(spatial, channel, strict=True))
    blocks = [{"block": b, "spatial_r": s, "channel_r": c} for b, (s, c) in pairs]
    return {"protocol": "insightface", "pairs": {"a": 40, "b": 40}, "low_res_size": size, "variant": "official",
            "arch": "ir_tiny_cbam", "data": "synthetic", "verification": {"a": models(0.0), "b": models(0.01)},
            "attention_correlation": {"askd": blocks}}


def test_the_table_arithmetic():
    cells = {
        (8, 0): results(14, 0.90, 0.70, 0.80, [0.5, 0.7], [0.9, 0.9]),
        (8, 1): results(14, 0.92, 0.72, 0.90, [0.8, 0.8], [1.0, 0.9]),
        (8, 2): results(14, 0.94, 0.74, 0.85, [0.6, 0.8], [0.8, 0.8]),
        (4, 0): results(28, 0.50, 0.80, 0.88, [0.9, 0.9], [0.9, 0.9]),  # HR rows come from the first scale only
    }
    t = experiment.summarise(cells)
    by_row = {(row["scale"], row["model"]): row for row in t["accuracy"]}
    assert list(by_row) == [(None, "teacher (HR)"), (8, "teacher (LR)"), (8, "student askd (LR)"),
                            (4, "teacher (LR)"), (4, "student askd (LR)")]
    # 0.80, 0.90, 0.85: mean 0.85; deviations -0.05, 0.05, 0: sample variance 0.005 / 2, std 0.05
    student = by_row[(8, "student askd (LR)")]
    assert student["n"] == 3 and student["accuracy"]["a"]["mean"] == pytest.approx(0.85)
    assert student["accuracy"]["a"]["std"] == pytest.approx(0.05)
    assert student["accuracy"]["b"]["mean"] == pytest.approx(0.86)
    assert student["accuracy"]["b"]["std"] == pytest.approx(0.05)
    hr = by_row[(None, "teacher (HR)")]["accuracy"]["a"]  # 0.90, 0.92, 0.94: std 0.02
    assert hr["mean"] == pytest.approx(0.92) and hr["std"] == pytest.approx(0.02)
    # one seed at 4x: the std is None, "-" in the table
    assert by_row[(4, "student askd (LR)")]["accuracy"]["a"] == {"mean": 0.88, "std": None, "values": [0.88]}
    # block means: spatial 0.6, 0.8, 0.7 (mean 0.7, std 0.1); channel 0.9, 0.95, 0.8 (mean 0.88333, std 0.07638)
    corr = t["correlation"][0]
    assert (corr["scale"], corr["method"], corr["n"]) == (8, "askd", 3)
    assert corr["spatial"]["mean"] == pytest.approx(0.7) and corr["spatial"]["std"] == pytest.approx(0.1)
    assert corr["channel"]["mean"] == pytest.approx(0.88333, abs=1e-5)
    assert corr["channel"]["std"] == pytest.approx(0.076376, abs=1e-6)
    md = experiment.format_table(t)
    assert "| 8x (14 px) | student askd (LR) | 85.00 ± 5.00 | 86.00 ± 5.00 |" in md
    assert "| HR (112 px) | teacher (HR) | 92.00 ± 2.00 | 93.00 ± 2.00 |" in md
    assert "| 4x (28 px) | student askd (LR) | 88.00 ± - | 89.00 ± - |" in md
    assert "| 8x (14 px) | askd | 0.70 ± 0.10 | 0.88 ± 0.08 |" in md


@pytest.mark.parametrize("argv, says", [
    (["--method", "base,nope"], "config key 'method'"),
    (["--scale", "3"], "--scale: scale '3', expected a list of scales out of [2, 4, 8]"),
    (["--scale", "4,x"], "--scale: scale '4,x'"),
    (["--scale", "8,8"], "names a scale twice"),
    (["--seeds", "0"], "--seeds: seeds 0, expected a number of seeds >= 1"),
    (["--set", "low_res_size=20"], "config key 'low_res_size'"),
    (["--set", "phases=teacher"], "config key 'phases'"),
    (["--grid", "{grid}"], "unknown config key 'sedes'"),
    (["--teachers", "{grid}"], "no teacher for seed 0"),
    (["--teachers", "x", "--set", "teacher=t.pt"], "not together with the config key 'teacher'"),
])
def test_bad_grids_are_refused(tmp_path, capsys, argv, says):
    grid = tmp_path / "grid.toml"
    grid.write_text("method = 'base'\nscale = [4]\nsedes = 2\n")
    argv = [a.replace("{grid}", str(grid)) for a in argv]
    assert experiment.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("askd.experiment: error: ") and says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # found before anything is written


def test_grid_files_and_presets(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text("method = 'base,kd'\nscale = 4\nseeds = [3, 7]\nepochs = 2\n")
    g = experiment.parse_args(["--grid", str(grid), "--set", "epochs=3"])
    assert (g.base.method, g.scales, g.seeds, g.base.epochs) == ("base,kd", [4], [3, 7], 3)  # --set over the file
    assert g.base.out == "runs/experiment"
    g = experiment.parse_args(["--preset", "table1", "--seeds", "2", "--seed", "5", "--method", "base,askd"])
    assert (g.base.method, g.scales, g.seeds) == ("base,askd", [2, 4, 8], [5, 6])  # flags over the preset
    g = experiment.parse_args(["--preset", "table3"])
    assert (g.base.method, g.scales, g.seeds) == ("at,at_cos,askd_sa,askd", [8], [0])
