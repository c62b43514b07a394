"""``python -m askd.compare``: students of one or more ``askd.experiment`` folders against the baseline student of
the same seed and teacher; settings chosen on one verification set, reported on another.

    python -m askd.compare runs/main runs/askd_w20 runs/epochs40 --select val --report held-out --out runs/cmp

A *setting* is a student method in one experiment folder, named by the method and the config keys that differ
between the folders (``askd, distill_weight=20``; with the folder's name where that is not enough). Each of its
runs, one per (scale, seed), is paired with the ``--baseline`` student (default ``base``) of the same cell: from
its own folder where that trained one, else from the first folder (also for a baseline student of a later
folder); a pair whose two runs distilled from different teachers is refused. Per scale and per pair of
(setting, baseline) over the seeds, on a set: the mean difference (percentage points), its 95% confidence
interval (Student's t), the paired t-test's two-sided p, the exact sign-flip test's p (every +- assignment of
the differences; with n pairs it cannot go below 2 / 2^n), and wins / ties / losses. A set is a verification
set of face runs (``held-out``, ``val``, a .bin's name) or a classification run's ``"<split> top-1"``.

The choice: per scale and method, the setting with the highest mean accuracy on ``--select`` (the baseline's
settings compete too). The report gives every setting on both sets, marks the chosen ones, and tests the chosen
ones on ``--report``: settings chosen on a validation split and tested on held-out identities, as the paper did.

``OUT/compare.md``, ``OUT/compare.json`` and, with matplotlib, ``OUT/paired.png``: the per-seed differences of
the chosen settings on ``--report`` with their mean and confidence interval. An unfinished experiment (no
``table.json``) is read with its finished cells and a note on stderr. Bad input ends with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import replacing
from .config import Config, ConfigError, apply, load_toml
from .experiment import pyplot, resolution, save_png, scores, stats

# keys that name where a run is or which cell it is, not its setting
PLACE_KEYS = ("out", "teacher", "seed", "scale", "resume", "method", "phases")


@dataclass(frozen=True)
class Setting:
    """A student method trained with one config (an experiment folder): ``name`` for tables, ``runs`` its cells
    {(scale, seed): results.json's dict}, ``teachers`` {(scale, seed): teacher checkpoint}."""

    name: str
    method: str
    folder: Path
    runs: dict[tuple[int, int], dict]
    teachers: dict[tuple[int, int], str]


def read_folder(folder: Path) -> tuple[Config, dict[tuple[int, int], dict], dict[tuple[int, int], str]]:
    """An experiment folder's config (of its first cell), its finished cells' results and their teachers."""
    cells = sorted(folder.glob("scale*_seed*/results.json"))
    if not cells:
        raise ConfigError(f"{folder}: no finished cells (scale<s>_seed<k>/results.json); is it an askd.experiment "
                          f"folder?")
    if not (folder / "table.json").is_file():  # the experiment is still running, or was interrupted
        print(f"askd.compare: {folder}: experiment not finished (no table.json); using its {len(cells)} finished "
              f"cells", file=sys.stderr)
    runs, teachers, cfg = {}, {}, None
    for path in cells:
        c = apply(Config(), load_toml(path.parent / "config.toml"), str(path.parent / "config.toml"))
        cfg = cfg or c
        runs[(c.scale, c.seed)] = json.loads(path.read_text())
        teachers[(c.scale, c.seed)] = str(Path(c.teacher).resolve())
    return cfg, runs, teachers


def settings_of(folders: list[Path]) -> list[Setting]:
    """Every (folder, student method) as a Setting, named by the config keys that differ between the folders."""
    read = [(folder, *read_folder(folder)) for folder in folders]
    configs = [vars(cfg) for _, cfg, _, _ in read]
    differ = [k for k in configs[0] if k not in PLACE_KEYS and len({repr(c[k]) for c in configs}) > 1]
    found = []
    for folder, cfg, runs, teachers in read:
        label = "".join(f", {k}={getattr(cfg, k)}" for k in differ)
        found += [Setting(m.strip() + label, m.strip(), folder, runs, teachers) for m in cfg.method.split(",")]
    if len({s.name for s in found}) < len(found):  # folders of the same settings (other seeds, say)
        found = [dataclasses.replace(s, name=f"{s.name}, folder {s.folder.name}") for s in found]
    return found


def accuracy(s: Setting, cell: tuple[int, int], name: str) -> float:
    """Accuracy (%) of setting ``s``'s student in ``cell`` on set ``name``: a verification set of a face run, or a
    classification run's ``"<split> top-1"`` / ``"<split> top-5"``."""
    sets = scores(s.runs[cell])
    if name not in sets:
        raise ConfigError(f"{s.folder / 'scale{}_seed{}'.format(*cell)}: no set {name!r} (it has "
                          f"{', '.join(sets)}); train with --set val_fraction=0.2 for a 'val' verification set")
    return 100 * sets[name][f"student {s.method} (LR)"]["accuracy"]


def baseline_of(s: Setting, settings: list[Setting], baseline: str) -> Setting:
    """The baseline Setting that ``s`` is paired with: its own folder's, else (and for a baseline student) the first
    folder's."""
    own = [b for b in settings if b.method == baseline and b.folder == s.folder and s.method != baseline]
    first = [b for b in settings if b.method == baseline and b.folder == settings[0].folder]
    if not own and not first:
        raise ConfigError(f"no {baseline!r} student in {s.folder} or {settings[0].folder}; name the baseline's "
                          f"folder first or pass --baseline")
    return (own or first)[0]


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) of Student's t with ``df`` degrees of freedom: 1/2 + the density integrated from 0 (Simpson)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n, x = 2000, abs(t)
    f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * x / n) ** 2 / df)) for i in range(n + 1)]
    area = x / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 0.5 + math.copysign(area, t)


def t_quantile(q: float, df: int) -> float:
    """The t with P(T <= t) = q (bisection on :func:`t_cdf`)."""
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided p of the sign-flip (permutation) test: the share of the 2^n +- assignments whose |mean| is
    at least the observed one."""
    observed = abs(sum(diffs))
    flips = [abs(sum(s * d for s, d in zip(signs, diffs, strict=True)))
             for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-9 for f in flips) / len(flips)


def paired(diffs: list[float]) -> dict:
    """Mean difference, 95% t interval, paired t-test p, sign-flip p, wins/ties/losses of paired differences."""
    n, mean = len(diffs), statistics.fmean(diffs)
    out = {"n": n, "mean": mean, "diffs": diffs, "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
           "losses": sum(d < 0 for d in diffs), "sign_flip_p": sign_flip_p(diffs)}
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    if n > 1 and sd > 0:
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        t = mean / (sd / math.sqrt(n))
        out.update(ci=[mean - half, mean + half], t=t, t_p=2 * (1 - t_cdf(abs(t), n - 1)))
    else:  # one pair, or identical differences: no interval
        out.update(ci=None, t=None, t_p=None)
    return out


def pair_diffs(s: Setting, b: Setting, scale: int | None, name: str) -> list[float]:
    """Accuracy of ``s`` minus that of ``b`` (points) on set ``name``, per seed of ``scale`` (None: every scale),
    over the cells both have; a ConfigError where a pair's two runs distilled from different teachers."""
    cells = [c for c in s.runs if c in b.runs and scale in (None, c[0])]
    for c in cells:
        if s.teachers[c] != b.teachers[c]:
            raise ConfigError(f"{s.name} and {b.name} at scale {c[0]}, seed {c[1]} distilled from different teachers "
                              f"({s.teachers[c]}, {b.teachers[c]}); run the later experiment with --teachers")
    if not cells:
        raise ConfigError(f"{s.name} and {b.name} have no seed in common at scale {scale}; run both with the same "
                          f"--seeds and --scale")
    return [accuracy(s, c, name) - accuracy(b, c, name) for c in cells]


def summary(s: Setting, scale: int, name: str) -> dict:
    """Mean, sample std (None for one seed) and values of ``s``'s accuracy on set ``name`` over the seeds of
    ``scale`` (:func:`askd.experiment.stats`, as the experiment's own tables)."""
    return stats([accuracy(s, c, name) for c in s.runs if c[0] == scale])


def compare(folders: list[Path], baseline: str, select: str, report: str) -> dict:
    """compare.json's dict: every setting per scale (``settings``) and the chosen ones tested (``chosen``)."""
    settings = settings_of(folders)
    if not any(s.method == baseline for s in settings):
        raise ConfigError(f"no {baseline!r} student in {', '.join(map(str, folders))}")
    scales = sorted({c[0] for s in settings for c in s.runs})
    rows, chosen = [], []
    for scale in scales:
        here = [s for s in settings if any(c[0] == scale for c in s.runs)]
        if not any(s.method == baseline for s in here):
            raise ConfigError(f"no {baseline!r} student at scale {scale}: every scale needs one to pair with")
        best = {}  # per method, the setting with the highest mean on the selection set (the first of ties)
        for s in sorted(here, key=lambda s: -summary(s, scale, select)["mean"]):
            best.setdefault(s.method, s)
        for s in here:
            b = baseline_of(s, settings, baseline)
            row = {"scale": scale, "setting": s.name, "method": s.method, "baseline": b.name,
                   "chosen": best[s.method] is s, select: summary(s, scale, select), report: summary(s, scale, report)}
            if b is not s:
                row["paired"] = {name: paired(pair_diffs(s, b, scale, name)) for name in (select, report)}
            rows.append(row)
        b = best[baseline]
        for method in dict.fromkeys(s.method for s in here):  # in the folders' order, not by rank
            s = best[method]
            if method != baseline:
                chosen.append({"scale": scale, "setting": s.name, "baseline": b.name,
                               "paired": paired(pair_diffs(s, b, scale, report))})
    return {"folders": [str(f) for f in folders], "baseline": baseline, "select": select, "report": report,
            "scales": scales, "settings": rows, "chosen": chosen}


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, ``-`` for None."""
    return "-" if x is None else f"{x:.{digits}f}"


def signed(x: float) -> str:
    """``x`` with a sign and 2 decimals; a difference that rounds to zero is ``+0.00``, not ``-0.00``."""
    return f"{round(x, 2) + 0.0:+.2f}"


def paired_cells(p: dict) -> list[str]:
    """A paired comparison as table cells: mean difference, 95% CI, t-test p, sign-flip p, wins/ties/losses."""
    ci = "-" if p["ci"] is None else f"[{signed(p['ci'][0])}, {signed(p['ci'][1])}]"
    wtl = f"{p['wins']}/{p['ties']}/{p['losses']}"
    return [signed(p["mean"]), ci, fmt(p["t_p"], 3), f"{p['sign_flip_p']:.3f}", wtl]


def format_report(t: dict) -> str:
    """Markdown of compare.json's dict: the chosen settings tested, then every setting."""
    sel, rep = t["select"], t["report"]
    lines = [
        f"Settings chosen on '{sel}' (highest mean accuracy per scale and method), tested on '{rep}': accuracy "
        f"difference to the chosen {t['baseline']} student of the same seed and teacher, percentage points; 95% CI "
        f"(Student's t), paired t-test p, exact sign-flip p, wins/ties/losses over the seeds",
        "",
        "| resolution | setting | against | n | mean Δ | 95% CI | t-test p | sign-flip p | W/T/L |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in t["chosen"]:
        p = row["paired"]
        lines.append(f"| {resolution(row['scale'])} | {row['setting']} | {row['baseline']} | {p['n']} | "
                     + " | ".join(paired_cells(p)) + " |")
    lines += [
        "",
        f"Every setting: accuracy % (mean ± std over seeds) on '{sel}' and '{rep}'; Δ: the paired difference to its "
        f"own folder's {t['baseline']} student (else the first folder's), mean [95% CI]; * = chosen on '{sel}'",
        "",
        f"| resolution | setting | n | {sel} | Δ {sel} | {rep} | Δ {rep} |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in t["settings"]:
        cells = []
        for name in (sel, rep):
            s = row[name]
            cells.append(f"{s['mean']:.2f} ± {fmt(s['std'])}")
            p = row.get("paired", {}).get(name)
            ci = "" if p is None or p["ci"] is None else f" [{signed(p['ci'][0])}, {signed(p['ci'][1])}]"
            cells.append("-" if p is None else signed(p["mean"]) + ci)
        name = row["setting"] + (" *" if row["chosen"] else "")
        lines.append(f"| {resolution(row['scale'])} | {name} | {len(row[sel]['values'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(path: Path, t: dict) -> None:
    """``path`` (PNG): per scale, each chosen setting's per-seed differences to the baseline on the report set,
    with the mean and its 95% CI; a printed note instead where matplotlib is missing."""
    plt = pyplot("askd.compare", path)
    if plt is None:
        return
    most = max(sum(r["scale"] == scale for r in t["chosen"]) for scale in t["scales"])
    panel = max(3.0, 1.6 * most)  # inches: room for each setting's label, one config key per line
    fig, axes = plt.subplots(1, len(t["scales"]), figsize=(1 + panel * len(t["scales"]), 4.5), squeeze=False,
                             sharey=True)
    for ax, scale in zip(axes[0], t["scales"], strict=True):
        rows = [r for r in t["chosen"] if r["scale"] == scale]
        for i, row in enumerate(rows):
            p = row["paired"]
            ax.scatter([i] * p["n"], p["diffs"], s=14, color="tab:gray", zorder=2)
            err = None if p["ci"] is None else [[p["mean"] - p["ci"][0]], [p["ci"][1] - p["mean"]]]
            ax.errorbar([i + 0.15], [p["mean"]], yerr=err, fmt="o", color="tab:red", capsize=4, zorder=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [r["setting"].replace(", ", "\n") for r in rows], fontsize="small")
        ax.set_title(f"{resolution(scale)}: chosen on {t['select']}", fontsize="medium")
    axes[0][0].set_ylabel(f"{t['report']} accuracy − {t['baseline']} (points)")
    fig.tight_layout()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m askd.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="askd.experiment folders (the first one's baseline is the "
                   "reference)")
    p.add_argument("--baseline", default="base", help="the student method compared against (default base)")
    p.add_argument("--select", default="val", help="verification set the settings are chosen on (default val)")
    p.add_argument("--report", default="held-out", help="verification set the chosen ones are tested on")
    p.add_argument("--out", type=Path, help="folder for compare.md, compare.json and paired.png")
    args = p.parse_args(argv)
    try:
        t = compare(args.folders, args.baseline, args.select, args.report)
    except (ConfigError, OSError, ValueError) as e:
        print(f"askd.compare: error: {e}", file=sys.stderr)
        return 2
    report = format_report(t)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with replacing(args.out / "compare.json") as tmp:
            tmp.write_text(json.dumps(t, indent=2) + "\n")
        with replacing(args.out / "compare.md") as tmp:
            tmp.write_text(report + "\n")
        draw(args.out / "paired.png", t)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
