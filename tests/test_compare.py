"""``python -m askd.compare``: the statistics against known values, the pairing and the choice on made-up
experiment folders (results.json and config.toml written here, nothing trained), bad input refused."""

import json
import math

import pytest

from askd import compare
from askd.config import Config, to_toml


def test_t_distribution_against_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, t in ((1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert compare.t_quantile(0.975, df) == pytest.approx(t, abs=2e-4)
    assert compare.t_cdf(0.0, 3) == pytest.approx(0.5) and compare.t_cdf(-2.7764, 4) == pytest.approx(0.025, abs=1e-5)


def test_sign_flip_p_is_exact():
    assert compare.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == 2 / 32  # only all + and all - are as extreme
    assert compare.sign_flip_p([1.0, 1.0, -1.0]) == 1.0  # every pattern's |sum| (1 or 3) is at least the observed 1
    assert compare.sign_flip_p([3.0, 1.0, 1.0]) == 2 / 8  # |sum| >= 5 only for (+,+,+), (-,-,-); (+,+,-) gives 3


def test_paired_statistics_by_hand():
    d = [1.0, 2.0, 3.0, -0.5, 1.5]
    p = compare.paired(d)
    sd = math.sqrt(sum((x - 1.4) ** 2 for x in d) / 4)
    assert p["mean"] == pytest.approx(1.4) and p["t"] == pytest.approx(1.4 / (sd / math.sqrt(5)))
    assert p["ci"] == pytest.approx([1.4 - 2.776445 * sd / math.sqrt(5), 1.4 + 2.776445 * sd / math.sqrt(5)])
    assert p["t_p"] == pytest.approx(0.07286, abs=1e-4)  # scipy.stats.ttest_1samp(d, 0).pvalue
    assert (p["wins"], p["ties"], p["losses"]) == (4, 0, 1) and p["sign_flip_p"] == 4 / 32
    assert compare.paired([2.0, 2.0])["ci"] is None  # no spread: no interval
    assert compare.signed(-0.0001) == "+0.00" and compare.signed(-1.5) == "-1.50"  # no "-0.00" in the tables


def make_experiment(folder, method, accs, teachers, sets=("val", "held-out"), kind="verification", **keys):
    """An experiment folder with cells (scale, seed) -> {method: (% on sets[0], % on sets[1])}, as askd.experiment
    writes them: config.toml and results.json (``kind``: a face run's "verification", a classifier's "accuracy")
    per cell."""
    for (scale, seed), per_method in accs.items():
        cell = folder / f"scale{scale}_seed{seed}"
        cell.mkdir(parents=True)
        cfg = Config(method=method, scale=scale, seed=seed, out=str(cell), teacher=teachers(seed), **keys)
        (cell / "config.toml").write_text(to_toml(cfg))
        scores = {name: {f"student {m} (LR)": {"accuracy": a[i] / 100, "std": 0.01} for m, a in per_method.items()}
                  for i, name in enumerate(sets)}
        (cell / "results.json").write_text(json.dumps({kind: scores}))
    (folder / "table.json").write_text("{}")  # the experiment finished


@pytest.fixture
def study(tmp_path):
    """main: base and askd at weight 5; w20: askd at weight 20 (better on val, worse on held-out); 3 seeds at 8x."""
    teachers = lambda seed: str(tmp_path / "main" / f"seed{seed}" / "teacher" / "checkpoint.pt")  # noqa: E731
    main = {(8, k): {"base": (80 + k, 90 + k), "askd": (81 + k, 91 + 2 * k)} for k in range(3)}
    w20 = {(8, k): {"askd": (85 + k, 89 + k)} for k in range(3)}
    make_experiment(tmp_path / "main", "base,askd", main, teachers)
    make_experiment(tmp_path / "w20", "askd", w20, teachers, distill_weight=20.0)
    return tmp_path


def test_chosen_on_val_tested_on_held_out(study):
    t = compare.compare([study / "main", study / "w20"], "base", "val", "held-out")
    names = [(r["setting"], r["chosen"]) for r in t["settings"]]
    assert names == [("base, distill_weight=5.0", True), ("askd, distill_weight=5.0", False),
                     ("askd, distill_weight=20.0", True)]
    # weight 20 wins on val (85..87 against 81..83), so it is the one tested, on held-out: 89+k - (90+k) = -1
    (chosen,) = t["chosen"]
    assert chosen["setting"] == "askd, distill_weight=20.0" and chosen["paired"]["diffs"] == pytest.approx([-1.0] * 3)
    # every setting's own pairs: askd at weight 5 against base on held-out, (91 + 2k) - (90 + k) = 1 + k
    row = t["settings"][1]
    assert row["paired"]["held-out"]["diffs"] == pytest.approx([1.0, 2.0, 3.0])
    assert row["held-out"]["mean"] == pytest.approx(93.0) and row["held-out"]["std"] == pytest.approx(2.0)
    md = compare.format_report(t)
    assert "| 8x (14 px) | askd, distill_weight=20.0 | base, distill_weight=5.0 | 3 | -1.00 | - |" in md
    # constant differences: no interval
    assert "| 8x (14 px) | askd, distill_weight=20.0 * | 3 | 86.00 ± 1.00 | +5.00 | 90.00 ± 1.00 | -1.00 |" in md


def test_the_cli_writes_the_report(study, capsys):
    out = study / "cmp"
    assert compare.main([str(study / "main"), str(study / "w20"), "--out", str(out)]) == 0
    assert "Settings chosen on 'val'" in capsys.readouterr().out
    assert json.loads((out / "compare.json").read_text())["chosen"][0]["setting"] == "askd, distill_weight=20.0"
    assert (out / "compare.md").is_file()
    if compare_has_matplotlib():
        assert (out / "paired.png").read_bytes()[:4] == b"\x89PNG"


def compare_has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_classification_experiments(tmp_path):
    teachers = lambda seed: str(tmp_path / "t.pt")  # noqa: E731
    accs = {(4, k): {"base": (50 + k, 80), "askd+kd": (52 + 2 * k, 81)} for k in range(3)}
    make_experiment(tmp_path / "cls", "base,askd+kd", accs, teachers, sets=("val top-1", "val top-5"), kind="accuracy")
    t = compare.compare([tmp_path / "cls"], "base", "val top-5", "val top-1")
    assert t["chosen"][0]["paired"]["diffs"] == pytest.approx([2.0, 3.0, 4.0])


def test_a_later_folders_base_pairs_with_the_first_folders(study):
    teachers = lambda seed: str(study / "main" / f"seed{seed}" / "teacher" / "checkpoint.pt")  # noqa: E731
    make_experiment(study / "again", "base,askd", {(8, k): {"base": (80, 92 + k), "askd": (80, 90)} for k in range(3)},
                    teachers)
    t = compare.compare([study / "main", study / "again"], "base", "val", "held-out")
    # the same config in two folders: the folder names tell the settings apart
    assert [r["setting"] for r in t["settings"]] == ["base, folder main", "askd, folder main", "base, folder again",
                                                     "askd, folder again"]
    again_base, again_askd = t["settings"][2:]
    assert again_base["baseline"] == "base, folder main"  # (92 + k) - (90 + k)
    assert again_base["paired"]["held-out"]["diffs"] == pytest.approx([2.0] * 3)
    assert again_askd["baseline"] == "base, folder again"  # 90 - (92 + k)
    assert again_askd["paired"]["held-out"]["diffs"] == pytest.approx([-2.0, -3.0, -4.0])


def test_an_unfinished_experiment_is_named(study, capsys):
    (study / "w20" / "table.json").unlink()
    compare.compare([study / "main", study / "w20"], "base", "val", "held-out")
    assert "w20: experiment not finished (no table.json); using its 3 finished cells" in capsys.readouterr().err


def test_students_of_other_teachers_are_not_paired(study):
    other = lambda seed: str(study / "other" / f"seed{seed}" / "teacher.pt")  # noqa: E731
    make_experiment(study / "alone", "askd", {(8, 0): {"askd": (1.0, 2.0)}}, other)
    with pytest.raises(compare.ConfigError, match="distilled from different teachers"):
        compare.compare([study / "main", study / "alone"], "base", "val", "held-out")


def test_a_scale_or_seeds_without_a_baseline_are_named(study):
    teachers = lambda seed: str(study / "main" / f"seed{seed}" / "teacher" / "checkpoint.pt")  # noqa: E731
    make_experiment(study / "x4", "askd", {(4, 0): {"askd": (1.0, 2.0)}}, teachers)
    with pytest.raises(compare.ConfigError, match="no 'base' student at scale 4"):
        compare.compare([study / "main", study / "x4"], "base", "val", "held-out")
    make_experiment(study / "s9", "askd", {(8, 9): {"askd": (1.0, 2.0)}}, teachers)
    with pytest.raises(compare.ConfigError, match="have no seed in common at scale 8"):
        compare.compare([study / "main", study / "s9"], "base", "val", "held-out")


@pytest.mark.parametrize("argv, says", [
    (["{study}/nowhere"], "no finished cells"),
    (["{study}/w20"], "no 'base' student"),
    (["{study}/main", "--select", "lfw"], "no set 'lfw' (it has val, held-out)"),
])
def test_bad_input_is_one_line(study, capsys, argv, says):
    assert compare.main([a.replace("{study}", str(study)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("askd.compare: error: ") and says in err and "Traceback" not in err
