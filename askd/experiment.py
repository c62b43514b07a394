"""``python -m askd.experiment``: a grid of methods x LR scales x seeds, one ``askd.train`` run per cell, and
the paper's Table 1 over it (verification accuracy, mean +- std over seeds).

    python -m askd.experiment --method base,askd --scale 2,4,8 --seeds 3 --out runs/grid
    python -m askd.experiment --preset table1 --seeds 3 --config official_ir50 --data path/to/faces

The grid: ``--method`` (the config key: every cell trains every student of the grid), ``--scale`` (a comma
list of 2, 4, 8; default the config's scale) and ``--seeds N`` (N seeds counted from the config's ``seed``;
default 1); or a ``--grid FILE.toml`` of the keys ``scale`` (a list), ``seeds`` (a count, or a list of
seeds), ``teachers`` (as ``--teachers``) and any config key, the base config of every run; or a ``--preset``
(:data:`PRESETS`). Every flag of ``askd.train`` means the same here, except ``--scale``; the experiment sets
``scale``, ``phases`` and ``resume`` of each run itself (``low_res_size`` would override the scale, so it is
refused). Precedence: defaults (``out = "runs/experiment"``) < preset < grid file < ``--config`` < flags <
``--set``.

``OUT/`` holds plain ``askd.train`` run folders:

- ``seed{k}/``: seed k's HR teacher (``phases = "teacher"``), trained once for every scale: it sees only HR
  faces, so it does not depend on the scale (with the config key ``teacher`` set, that teacher is used instead;
  with ``--teachers DIR``, seed k's teacher of the earlier experiment in DIR, so that students of other settings
  are paired with the same teachers);
- ``scale{s}_seed{k}/``: a cell: every student of the grid distilled at scale s from seed k's teacher (config
  key ``teacher``), then the teacher on HR and LR and every student on LR verified (``results.json``);
- ``table.md``, ``table.json``: per resolution and model, on each verification set, the accuracy's mean and
  sample standard deviation (n-1) over the seeds (null in the JSON, "-" in the table, with one seed); per
  resolution and student, the Pearson r of teacher and student maps (spatial, channel), mean over the blocks,
  then mean +- std over the seeds; ``chart.png`` (with matplotlib): the students' accuracy per scale;
- with TensorBoard installed (``pip install askd[tensorboard]``), ``RUN/tb/``: each run's ``metrics.jsonl``
  as event files.

The same command continues an interrupted experiment: a run with ``results.json`` is finished and kept, one
without resumes from its checkpoints; a run folder started with other settings than the grid gives it is
refused, so that the table never mixes settings. Bad input ends with one line on stderr and exit status 2
before anything is written; 130 when interrupted. Under ``torchrun`` every run of the grid trains on all the
processes, and rank 0 keeps the folder, the progress bar and the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import distributed, runlock
from .atomic import replacing
from .config import CHOICES, Config, ConfigError, apply, load_toml
from .train.cli import add_config_flags, config_from, methods_help, run_cli
from .train.pipeline import run

# the paper's comparisons as grids: Table 1 (methods x resolutions), Table 3 (the attention ablation at 8x) and
# Table 4 (image classification at 4x).
# Here rather than in configs/: those files are --config presets of askd.train, flat config keys, and a grid's
# scale list is not a config value
PRESETS = {
    "table1": {"method": "base,fkd,at,horkd,askd,askd+kd", "scale": [2, 4, 8]},
    "table3": {"method": "at,at_cos,askd_sa,askd", "scale": [8]},
    # Table 4: LR image classification (the paper's section 5.1, 4x ImageNet); every student with logit KD
    "table4": {"task": "classify", "method": "base,kd,at+kd,rkd+kd,askd+kd", "scale": [4]},
}
GRID_KEYS = ("scale", "seeds", "teachers")
# config keys the experiment sets for each run (no flags for them here)
OWN_KEYS = ("scale", "low_res_size", "phases", "resume")
DEFAULT_OUT = "runs/experiment"


@dataclass(frozen=True)
class Run:
    """One run folder of the grid: ``OUT/name`` with config ``cfg``; ``scale`` None for a teacher's run."""

    name: str
    cfg: Config
    scale: int | None
    seed: int


@dataclass(frozen=True)
class Grid:
    """The base config (its ``out`` is the experiment's folder), the scales, the seeds, and the folder of an
    earlier experiment whose teachers the cells distil from ("" to train them)."""

    base: Config
    scales: list[int]
    seeds: list[int]
    teachers: str = ""

    def runs(self) -> list[Run]:
        """Seed by seed: the teacher's run (unless the config key ``teacher`` names one, or ``teachers`` an earlier
        experiment's), then a cell per scale."""
        out, runs = Path(self.base.out), []
        for seed in self.seeds:
            teacher = self.base.teacher or (self.teachers and teacher_of(self.teachers, seed))
            if not teacher:
                folder = out / f"seed{seed}"
                keys = {"seed": seed, "scale": self.scales[0], "out": str(folder), "phases": "teacher"}
                runs.append(Run(folder.name, apply(self.base, keys, "grid"), None, seed))
                teacher = str(folder / "teacher" / "checkpoint.pt")
            for scale in self.scales:
                folder = out / f"scale{scale}_seed{seed}"
                keys = {"seed": seed, "scale": scale, "out": str(folder), "teacher": teacher}
                runs.append(Run(folder.name, apply(self.base, keys, "grid"), scale, seed))
        return runs


def teacher_of(experiment: str, seed: int) -> str:
    """The HR teacher that the experiment in folder ``experiment`` trained for ``seed``; a ConfigError if none."""
    path = Path(experiment) / f"seed{seed}" / "teacher" / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"teachers {experiment!r}: no teacher for seed {seed} ({path} not found); run that "
                          f"experiment with seed {seed} first, or leave out --teachers")
    return str(path)


def parse_args(argv: list[str] | None) -> Grid:
    """Command line -> Grid (see the module docstring for the precedence)."""
    p = argparse.ArgumentParser(prog="python -m askd.experiment", description=__doc__.split("\n\n")[0],
                                epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", dest="scales", metavar="S,S,...", help="comma list of LR scales (2, 4, 8)")
    p.add_argument("--seeds", type=int, metavar="N", help="number of seeds, counted from the config's seed")
    p.add_argument("--teachers", metavar="DIR", help="distil from the HR teachers of the earlier experiment in DIR "
                   "(DIR/seed<k>/teacher/checkpoint.pt per seed) instead of training them")
    p.add_argument("--grid", metavar="FILE.toml", help="grid file: scale, seeds, teachers and config keys")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the methods and scales of the paper's table 1, 3 or 4")
    add_config_flags(p, skip=OWN_KEYS)
    args = p.parse_args(argv)
    base, grid = file_layers(args)
    if args.scales is not None:
        grid["scale"] = (args.scales, "--scale")
    if args.seeds is not None:
        grid["seeds"] = (args.seeds, "--seeds")
    if args.teachers is not None:
        grid["teachers"] = (args.teachers, "--teachers")
    cfg = check_base(config_from(args, base))
    scales = scale_list(*grid.get("scale", ([cfg.scale], "config")))
    teachers, source = grid.get("teachers", ("", "default"))
    if not isinstance(teachers, str) or (teachers and cfg.teacher):
        raise ConfigError(f"{source}: teachers {teachers!r}, expected the folder of an earlier experiment, and "
                          f"not together with the config key 'teacher'")
    return Grid(cfg, scales, seed_list(*grid.get("seeds", (1, "default")), first=cfg.seed), teachers)


def file_layers(args: argparse.Namespace) -> tuple[Config, dict[str, tuple[Any, str]]]:
    """The base config and the grid keys of ``--preset`` then ``--grid``: (Config, {key: (value, source)})."""
    layers = [(f"--preset {args.preset}", PRESETS[args.preset])] if args.preset else []
    if args.grid:
        layers.append((args.grid, load_toml(args.grid)))
    base, grid = Config(out=DEFAULT_OUT), {}
    for source, keys in layers:
        grid.update({k: (v, source) for k, v in keys.items() if k in GRID_KEYS})
        base = apply(base, {k: v for k, v in keys.items() if k not in GRID_KEYS}, source)
    return base, grid


def check_base(cfg: Config) -> Config:
    """Refuse the keys that would defeat the grid: a fixed LR size, or runs of one phase."""
    if cfg.low_res_size > 0:
        raise ConfigError(f"config key 'low_res_size': got {cfg.low_res_size}; the grid sets each run's scale, use 0")
    if cfg.phases != "all":
        raise ConfigError(f"config key 'phases': got {cfg.phases!r}; the grid sets each run's phases, use 'all'")
    return cfg


def scale_list(value: Any, source: str) -> list[int]:
    """``"2,4,8"`` (flag), ``[2, 4, 8]`` or ``8`` (TOML) -> [2, 4, 8], each one of :data:`askd.config.CHOICES`."""
    allowed = list(CHOICES["scale"])
    try:
        scales = [int(s) for s in value.split(",")] if isinstance(value, str) else value
    except ValueError:
        scales = None
    scales = [scales] if type(scales) is int else scales
    if not isinstance(scales, list) or not scales or any(type(s) is not int or s not in allowed for s in scales):
        raise ConfigError(f"{source}: scale {value!r}, expected a list of scales out of {allowed}")
    if len(set(scales)) < len(scales):
        raise ConfigError(f"{source}: scale {value!r} names a scale twice")
    return scales


def seed_list(value: Any, source: str, first: int) -> list[int]:
    """A count N (the seeds ``first``..``first+N-1``) or a list of distinct seeds -> the list of seeds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{source}: seeds {value}, expected a number of seeds >= 1")
        return list(range(first, first + value))
    if not isinstance(value, list) or not value or any(type(s) is not int for s in value):
        raise ConfigError(f"{source}: seeds {value!r}, expected a number of seeds or a list of integer seeds")
    if len(set(value)) < len(value):
        raise ConfigError(f"{source}: seeds {value!r} names a seed twice")
    return value


def check_settings(r: Run) -> None:
    """Refuse a run folder whose config.toml differs from what the grid gives it (``resume`` aside): its results
    would enter the table as if the grid's."""
    saved = Path(r.cfg.out) / "config.toml"
    if not saved.is_file():
        return
    old, new = dataclasses.asdict(apply(Config(), load_toml(saved), str(saved))), dataclasses.asdict(r.cfg)
    changed = [k for k in new if k != "resume" and old[k] != new[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"run folder {saved.parent} was started with {k} = {old[k]!r}, the grid gives it "
                          f"{new[k]!r}; run the grid it was started with, or use another --out")


def run_grid(grid: Grid) -> dict:
    """Every run of the grid not finished yet, then the tables and the chart; returns table.json's dict."""
    runs = grid.runs()
    for r in runs:
        check_settings(r)
    if not distributed.from_env().main:
        # under torchrun: train every unfinished run with rank 0, which writes, evaluates and summarises
        for r in runs:
            if not (Path(r.cfg.out) / "results.json").is_file():
                run(dataclasses.replace(r.cfg, resume=started(r)))
        return {}
    writer = tensorboard_writer()
    if writer is None:
        print("askd.experiment: tensorboard is not installed (pip install askd[tensorboard]): no event files")
    out, results = Path(grid.base.out), {}
    with runlock.hold(out):  # one experiment per folder: two would race for its runs and its tables
        bar = tqdm(total=len(runs), desc="experiment", unit="run", dynamic_ncols=True)
        for r in runs:
            results[r.name] = run_once(r, bar)
            if writer is not None and not (Path(r.cfg.out) / "tb").exists():
                write_events(Path(r.cfg.out), writer)
            bar.update()
        bar.close()
        table = summarise({(r.scale, r.seed): results[r.name] for r in runs if r.scale is not None})
        with replacing(out / "table.json") as tmp:
            tmp.write_text(json.dumps(table, indent=2) + "\n")
        with replacing(out / "table.md") as tmp:
            tmp.write_text(format_table(table) + "\n")
        draw_chart(out / "chart.png", table)
    print(format_table(table))
    return table


def run_once(r: Run, bar: tqdm) -> dict:
    """The results of run ``r``: read if it finished earlier, else from the run (resumed if it had started)."""
    folder = Path(r.cfg.out)
    if (folder / "results.json").is_file():
        bar.write(f"{r.name}: finished earlier, kept")
        return json.loads((folder / "results.json").read_text())
    t0, resume = time.perf_counter(), started(r)
    results = run(dataclasses.replace(r.cfg, resume=resume))
    bar.write(f"{r.name}: {headline(results)} ({time.perf_counter() - t0:.0f} s{', resumed' if resume else ''})")
    return results


def started(r: Run) -> bool:
    """Whether run ``r`` was started earlier (its folder has a config or a checkpoint): it resumes."""
    folder = Path(r.cfg.out)
    return (folder / "config.toml").is_file() or any(folder.glob("*/checkpoint*.pt"))


def scores(results: dict) -> dict:
    """{set: {model: {"accuracy", ...}}} of a results dict: a face run's verification sets, or a classification
    run's "<split> top-1" and "<split> top-5" columns."""
    return results["verification"] if "verification" in results else results["accuracy"]


def headline(results: dict) -> str:
    """The accuracies of a results dict on its first verification set, one line: ``held-out: base 78.3%, ...``."""
    name, rows = next(iter(scores(results).items()))
    shown = [(m, r) for m, r in rows.items() if m.startswith("student ")] or list(rows.items())
    return f"{name}: " + ", ".join(f"{short(m)} {100 * r['accuracy']:.1f}%" for m, r in shown)


def short(model: str) -> str:
    """``student askd (LR)`` -> ``askd``: a student's method; other names as they are."""
    return model.removeprefix("student ").removesuffix(" (LR)") if model.startswith("student ") else model


def stats(values: list[float]) -> dict:
    """Mean and sample standard deviation (n-1; None for one value) of ``values``, and the values."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def summarise(cells: dict[tuple[int, int], dict]) -> dict:
    """table.json's dict from the cells' results dicts, keyed (scale, seed) in grid order.

    ``accuracy``: one row per (resolution, model), the models of results.json (``teacher (LR)``, ``student askd
    (LR)``...), with {set: stats over seeds}; the models on HR (the teacher, HORKD's assistants) do not depend
    on the scale and are one row of resolution ``scale`` None, from the first scale's cells. ``correlation``:
    one row per (scale, student), stats over seeds of the mean over blocks of spatial and channel r."""
    scales = list(dict.fromkeys(s for s, _ in cells))
    first = next(iter(cells.values()))
    sets = list(scores(first))
    models = list(scores(first)[sets[0]])
    accuracy, correlation = [], []
    for scale in [None, *scales]:
        runs = [r for (s, _), r in cells.items() if s == (scale or scales[0])]
        for model in [m for m in models if m.endswith("(HR)") == (scale is None)]:
            per_set = {name: stats([scores(r)[name][model]["accuracy"] for r in runs]) for name in sets}
            size = runs[0]["low_res_size"] if scale else None
            accuracy.append({"scale": scale, "low_res_size": size, "model": model, "n": len(runs), "accuracy": per_set})
    for scale in scales:
        runs = [r for (s, _), r in cells.items() if s == scale]
        for method in runs[0]["attention_correlation"]:
            blocks = [r["attention_correlation"][method] for r in runs]
            kinds = {kind: stats([statistics.fmean(b[f"{kind}_r"] for b in per_run) for per_run in blocks])
                     for kind in ("spatial", "channel")}
            correlation.append({"scale": scale, "method": method, "n": len(runs), **kinds})
    keys = ("arch", "variant", "protocol", "data")
    evaluated = {"pairs": first["pairs"]} if "pairs" in first else {"images": first["images"]}
    evaluated["input_size"] = first.get("input_size", 112)  # a face run's results do not say: always 112
    return {**{k: first[k] for k in keys}, **evaluated, "seeds": list(dict.fromkeys(k for _, k in cells)),
            "sets": sets, "accuracy": accuracy, "correlation": correlation}


def cell(s: dict, factor: float = 1.0) -> str:
    """``mean ± std`` of a stats dict, times ``factor``; ``-`` for the std of one seed."""
    std = "-" if s["std"] is None else f"{factor * s['std']:.2f}"
    return f"{factor * s['mean']:.2f} ± {std}"


def resolution(scale: int | None, side: int = 112) -> str:
    """A row's resolution for HR images of ``side`` px: ``HR (112 px)`` or ``8x (14 px)``."""
    return f"HR ({side} px)" if scale is None else f"{scale}x ({side // scale} px)"


def format_table(t: dict) -> str:
    """Markdown of table.json's dict: accuracy per resolution and model, then the map correlation."""
    if "pairs" in t:
        pairs = ", ".join(f"{name} {n}" for name, n in t["pairs"].items())
        evaluated = f"verification pairs: {pairs} ({t['protocol']} protocol, 10 folds, flip TTA)"
    else:
        evaluated = "validation images: " + ", ".join(f"{name} {n}" for name, n in t["images"].items())
        evaluated += f" ({t['protocol']})"
    seeds, side = ", ".join(str(k) for k in t["seeds"]), t.get("input_size", 112)  # older tables: faces, 112
    lines = [
        f"{t['arch']} / {t['variant']}, data {t['data']}, {evaluated}; seeds {seeds}",
        "",
        "Accuracy %, mean ± std over seeds (sample std, n-1; - with one seed)",
        "",
        "| resolution | model | " + " | ".join(t["sets"]) + " |",
        "|---" * (len(t["sets"]) + 2) + "|",
    ]
    for row in t["accuracy"]:
        accs = " | ".join(cell(row["accuracy"][name], 100) for name in t["sets"])
        lines.append(f"| {resolution(row['scale'], side)} | {row['model']} | {accs} |")
    if t["correlation"]:
        title = "Pearson r, teacher maps on HR vs student maps on LR, mean over the blocks; mean ± std over seeds"
        lines += ["", title, "", "| resolution | student | spatial | channel |", "|---|---|---|---|"]
        lines += [f"| {resolution(row['scale'], side)} | {row['method']} | {cell(row['spatial'])} | "
                  f"{cell(row['channel'])} |" for row in t["correlation"]]
    return "\n".join(lines)


def pyplot(prog: str, path: Path):
    """matplotlib.pyplot on the file-only Agg backend, or None, with a note from ``prog`` that ``path`` is not drawn,
    where the optional matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"{prog}: matplotlib is not installed (pip install matplotlib): no {path.name}")
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write matplotlib figure ``fig`` to ``path`` as a PNG in one piece (never half-written), then close it."""
    import matplotlib.pyplot as plt  # loaded already: the figure came from it

    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def draw_chart(path: Path, t: dict) -> None:
    """``path`` (PNG): the students' accuracy per scale, bars with the std over seeds, one panel per verification
    set; a printed note instead where matplotlib is missing."""
    plt = pyplot("askd.experiment", path)
    if plt is None:
        return

    rows = [row for row in t["accuracy"] if row["model"].startswith("student ")]
    models, scales = list(dict.fromkeys(r["model"] for r in rows)), list(dict.fromkeys(r["scale"] for r in rows))
    width = 0.8 / len(models)
    panel = max(1.5 * len(scales), 0.5 * len(models), 3.0)  # inches: room for every bar and the title
    fig, axes = plt.subplots(1, len(t["sets"]), figsize=(1.5 + panel * len(t["sets"]), 4), squeeze=False)
    for ax, name in zip(axes[0], t["sets"], strict=True):
        lowest = 100.0
        for i, model in enumerate(models):
            mine = [r for r in rows if r["model"] == model]
            x = [scales.index(r["scale"]) + (i - (len(models) - 1) / 2) * width for r in mine]
            means = [100 * r["accuracy"][name]["mean"] for r in mine]
            errs = [100 * (r["accuracy"][name]["std"] or 0.0) for r in mine]
            ax.bar(x, means, width, yerr=errs, capsize=3, label=short(model))
            lowest = min(lowest, *(m - e for m, e in zip(means, errs, strict=True)))
        # the axis starts near the lowest bar, not at 0, so that differences of a point can be seen (it is labelled)
        ax.set_ylim(bottom=max(0.0, 5 * (lowest // 5) - 5))
        ax.set_xticks(range(len(scales)), [resolution(s, t.get("input_size", 112)) for s in scales])
        ax.set_title(f"{name}: students on LR,\nmean ± std over {len(t['seeds'])} seed(s)", fontsize="medium")
        ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside, not over, the bars
    fig.tight_layout()
    save_png(fig, path)


def tensorboard_writer() -> type | None:
    """torch's SummaryWriter, or None where the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def write_events(folder: Path, writer_cls: type) -> None:
    """``folder/tb/``: every ``metrics.jsonl`` of a run folder as scalars at their step, tagged ``<phase>/<key>``
    (loss terms, acc, lr, img_per_s) and ``<phase>/eval/<set>`` (verification in training)."""
    writer = writer_cls(log_dir=str(folder / "tb"))
    try:
        for log in sorted(folder.glob("*/metrics.jsonl")):
            for line in log.read_text().splitlines():
                row = json.loads(line)
                scalars = {f"eval/{name}": acc for name, acc in row.get("eval", {}).items()}
                scalars.update({k: v for k, v in row.items() if k not in ("phase", "step", "epoch", "eval")})
                for key, value in scalars.items():
                    writer.add_scalar(f"{log.parent.name}/{key}", value, row["step"])
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    return run_cli("askd.experiment", parse_args, run_grid, "run the same command again to continue", argv)


if __name__ == "__main__":
    sys.exit(main())
