"""Turn a pytest-benchmark JSON into a markdown report of ratios against eager (and torch.compile).

    pytest bench/ --benchmark-only --benchmark-json=bench/results/cpu.json
    python -m bench.report bench/results/cpu.json            # writes bench/results/cpu.md and cpu.png

Times are medians (robust to a busy machine); a ratio is eager's median over the implementation's, so > 1
means faster than eager. Summary lines give geometric means over the IR-50 stage shapes. The training-step
table adds images/s and the step's peak memory; its "interleaved" ratios divide by the eager steps run
between each set-up's own rounds (robust to a machine whose speed drifts from one set-up to the next), and
"where the time goes" lists the top ops of one profiled step per set-up. The roofline section states every
figure against the machine's roofs measured in the same session (:mod:`bench.roofs`): the training step in
GFLOP/s and % of the compute roof of its dtype, CBAM and the loss in GB/s and % of the copy bandwidth. The PNG
is a bar chart of the summary and, where the JSON has roofs, of each set-up's share of its roof (it needs
matplotlib: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

# implementations (kernel benchmarks) and set-ups (the training step), in table order
ORDER = ("eager", "eager_amp_cl", "compile", "reference", "ext", "triton", "fused", "fused_amp_cl", "fused_compile",
         "fused_compile_student_only", "fused_unfolded_teacher")


def ordered(impls) -> list[str]:
    """``impls`` in table order: those of ORDER first, any other after them by name (none is ever dropped)."""
    impls = set(impls)
    return [i for i in ORDER if i in impls] + sorted(impls - set(ORDER))


def load(path: Path) -> tuple[dict, dict[str, dict[str, float]], dict[str, dict[str, dict]]]:
    """(machine info, group -> impl -> median seconds, group -> impl -> extra_info)."""
    data = json.loads(path.read_text())
    medians, extra = defaultdict(dict), defaultdict(dict)
    for bench in data["benchmarks"]:
        params = bench["params"]
        impl = params.get("impl") or params["setup"]
        medians[bench["group"]][impl] = bench["stats"]["median"]
        extra[bench["group"]][impl] = bench["extra_info"]
    return {**data["machine_info"], "datetime": data.get("datetime", "")}, medians, extra


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def interleaved(times: dict[str, float], extra: dict[str, dict]) -> dict[str, float] | None:
    """impl -> speed-up over the eager steps run between its own rounds (``eager_between_s``), or None."""
    if not all("eager_between_s" in extra[impl] for impl in times):
        return None
    return {impl: extra[impl]["eager_between_s"] / t for impl, t in times.items()}


def group_table(group: str, times: dict[str, float], extra: dict[str, dict]) -> list[str]:
    """One group's rows; images/s, peak memory and interleaved ratios where the benchmarks recorded them."""
    step = any("images_per_step" in e for e in extra.values())
    inter = interleaved(times, extra)
    header = "| impl | median ms | vs eager | vs compile | first call s |"
    header += " images/s | peak MB |" if step else ""
    header += " vs eager, interleaved | vs compile, interleaved |" if inter else ""
    lines = [f"### {group}", "", header, "|---" + "|---:" * (header.count("|") - 2) + "|"]
    for impl in ordered(times):
        t, e = times[impl], extra[impl]
        vs_eager = times["eager"] / t if "eager" in times else float("nan")
        vs_compile = times["compile"] / t if "compile" in times else float("nan")
        first = e.get("first_call_s", math.nan)
        row = f"| {impl} | {t * 1e3:.3f} | {vs_eager:.2f}x | {vs_compile:.2f}x | {first:.1f} |"
        if step:
            row += f" {e.get('images_per_step', math.nan) / t:.1f} | {e.get('peak_mb', math.nan):.0f} |"
        if inter:
            row += f" {inter[impl]:.2f}x | {inter[impl] / inter.get('compile', math.nan):.2f}x |"
        lines.append(row)
    return [*lines, ""]


def profile_tables(group: str, extra: dict[str, dict]) -> list[str]:
    """The top ops of the profiled step of each set-up in ``group`` (self time: an op's own, not its callees')."""
    lines = []
    for impl in ordered(i for i, e in extra.items() if "profile" in e):
        lines += [f"#### {impl}", "", "| op | self ms | % | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{name}` | {ms:.1f} | {pct:.1f} | {calls} |" for name, ms, pct, calls in extra[impl]["profile"]]
        lines.append("")
    return [f"### {group}", "", *lines] if lines else []


def ratios(medians: dict[str, dict[str, float]], extra: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """group -> impl -> speed-up over eager; groups with interleaved eager steps also as "<group> interleaved"."""
    out = {}
    for group, times in medians.items():
        if "eager" in times:
            out[group] = {impl: times["eager"] / t for impl, t in times.items()}
        inter = interleaved(times, extra[group])
        if inter:
            kind, rest = group.split(" B=", 1)
            out[f"{kind}, interleaved B={rest}"] = inter
    return out


def speedups(ratios: dict[str, dict[str, float]]) -> list[tuple[str, str, float, float, int]]:
    """(benchmark kind, impl, geomean vs eager, geomean vs compile, groups) for every non-eager impl."""
    kinds = defaultdict(list)
    for group, r in ratios.items():
        kinds[group.split(" B=")[0]].append(r)
    rows = []
    for kind, groups in kinds.items():
        for impl in ordered(i for g in groups for i in g if i != "eager"):
            found = [g for g in groups if impl in g]
            if found:
                vs_eager = geomean([g[impl] for g in found])
                vs_compile = geomean([g[impl] / g["compile"] for g in found if "compile" in g])
                rows.append((kind, impl, vs_eager, vs_compile, len(found)))
    return rows


def summary(ratios: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| benchmark | impl | vs eager | vs compile | groups |", "|---|---|---:|---:|---:|"]
    lines += [f"| {k} | {i} | {e:.2f}x | {c:.2f}x | {n} |" for k, i, e, c, n in speedups(ratios)]
    return lines


def roofline(machine: dict, medians: dict[str, dict[str, float]], extra: dict[str, dict[str, dict]]) -> list[tuple]:
    """(group, impl, achieved, unit, % of its roof or None) for every benchmark that recorded its work: FLOPs
    (the training step, against the compute roof of its dtype) or bytes (against the copy bandwidth)."""
    roofs, rows = machine.get("roofs") or {}, []
    for group in sorted(medians):
        for impl in ordered(medians[group]):
            t, e = medians[group][impl], extra[group][impl]
            if "flops" in e:
                rate, unit = e["flops"] / t / 1e9, "GFLOP/s"
                roof = roofs.get(e.get("dtype", "float32"), {}).get("gflops")
            elif "bytes" in e:
                rate, unit, roof = e["bytes"] / t / 1e9, "GB/s", roofs.get("copy", {}).get("gbs")
            else:
                continue
            rows.append((group, impl, rate, unit, 100 * rate / roof if roof else None))
    return rows


def roofline_section(machine: dict, medians, extra) -> list[str]:
    """The roofs and every figure against them, as markdown; a note where the JSON has no roofs."""
    roofs = machine.get("roofs")
    if not roofs:
        return ["## Roofline", "", "No roofs in this JSON (made before the bench measured them).", ""]
    lines = ["## Roofline (roofs measured at the start of the same session)", "", "| roof | value | measured by |",
             "|---|---:|---|"]
    for dtype in ("float32", "bfloat16"):
        r = roofs.get(dtype, {})
        value = f"{r['gflops']:.1f} GFLOP/s" if "gflops" in r else "not measured"
        lines.append(f"| compute {dtype} | {value} | {r.get('by') or r.get('not_measured', '')} |")
    lines += [f"| copy bandwidth | {roofs['copy']['gbs']:.1f} GB/s | copy_ of {roofs['copy']['numel']:,} fp32, "
              "read + write |", "", "| benchmark | impl | achieved | % of roof |", "|---|---|---:|---:|"]
    for group, impl, rate, unit, pct in roofline(machine, medians, extra):
        lines.append(f"| {group} | {impl} | {rate:.1f} {unit} | {'-' if pct is None else f'{pct:.1f}%'} |")
    return [*lines, ""]


def report(path: Path, command: str) -> str:
    machine, medians, extra = load(path)
    lines = [
        f"# askd benchmarks: {machine.get('device', '?')}",
        "",
        f"- machine: {machine.get('cpu_model', '?')}; {machine.get('threads', '?')} torch threads"
        + (f"; {machine['malloc']}" if "malloc" in machine else ""),
        f"- torch {machine.get('torch', '?')}; askd._C: {machine.get('askd_ext', '?')}",
        f"- batch {machine.get('batch', '?')}, {machine.get('dtype', '?')}; run {machine.get('datetime', '')}",
        f"- command: `{command}`",
        f"- raw data: `{path.name}` (pytest-benchmark JSON); times are medians, ratios are eager / impl",
        "",
        "## Summary (geometric means over the groups)",
        "",
        *summary(ratios(medians, extra)),
        "",
        *roofline_section(machine, medians, extra),
        "## Per group",
        "",
    ]
    for group in sorted(medians):
        lines += group_table(group, medians[group], extra[group])
    profiled = [line for group in sorted(medians) for line in profile_tables(group, extra[group])]
    if profiled:
        lines += ["## Where the time goes (one profiled step per set-up, top ops by self time)", "", *profiled]
    return "\n".join(lines)


def chart(path: Path, out: Path) -> None:
    """Horizontal bar charts: the summary speed-ups over eager (log scale, 1x marked) and, where the JSON has
    roofs, every benchmark's share of its roof (%)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    machine, medians, extra = load(path)
    rows = [(f"{kind}: {impl}", r) for kind, impl, r, _, _ in speedups(ratios(medians, extra))][::-1]  # table order
    shares = [(f"{group.split(' torch.')[0].split(' (')[0]}: {impl}", pct)  # the group without dtype and notes
              for group, impl, _, _, pct in roofline(machine, medians, extra) if pct is not None][::-1]
    heights = [0.32 * len(rows) + 1.2] + ([0.22 * len(shares) + 1.2] if shares else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, sum(heights)), height_ratios=heights, squeeze=False)
    ax = axes[0][0]
    colours = ["tab:green" if r >= 1 else "tab:red" for _, r in rows]
    # bars grow from 1x: right for faster than eager, left for slower
    ax.barh([label for label, _ in rows], [r - 1 for _, r in rows], left=1.0, color=colours)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, (_, r) in enumerate(rows):
        ax.text(r, y, f" {r:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("speed-up over eager (median time, geometric mean over shapes; > 1 is faster)")
    ax.set_title(f"askd: {machine.get('device', '?')}, torch {machine.get('torch', '?')}", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    if shares:
        ax = axes[1][0]
        ax.barh([label for label, _ in shares], [p for _, p in shares], color="tab:blue")
        ax.axvline(100.0, color="black", linewidth=0.8)
        for y, (_, p) in enumerate(shares):
            ax.text(p, y, f" {p:.0f}%", va="center", fontsize=7)
        ax.set_xlabel("% of the roof measured in the same session\n(step: compute of its dtype; ops: copy bandwidth)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, help="markdown file (default: the JSON path with .md)")
    parser.add_argument("--command", default="pytest bench/ --benchmark-only", help="the command that made the JSON")
    parser.add_argument("--no-png", action="store_true", help="skip the bar chart (the JSON path with .png)")
    args = parser.parse_args()
    if not args.json.is_file():
        parser.error(f"no such file: {args.json}")
    out = args.out or args.json.with_suffix(".md")
    out.write_text(report(args.json, args.command) + "\n")
    print(f"wrote {out}")
    if args.no_png:
        return
    try:
        chart(args.json, out.with_suffix(".png"))
    except ImportError:
        parser.exit(1, "bench.report: the PNG chart needs matplotlib (pip install matplotlib); or pass --no-png\n")
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
