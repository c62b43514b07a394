"""Turn a pytest-benchmark JSON into a markdown report of ratios against eager (and torch.compile).

    pytest bench/ --benchmark-only --benchmark-json=bench/results/cpu.json
    python -m bench.report bench/results/cpu.json            # writes bench/results/cpu.md

Times are medians (robust to a busy machine); a ratio is eager's median over the implementation's, so > 1
means faster than eager. Summary lines give geometric means over the IR-50 stage shapes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

# implementations (kernel benchmarks) and set-ups (the training step), in table order
ORDER = ("eager", "eager_amp_cl", "compile", "ext", "triton", "fused", "fused_amp_cl", "fused_compile")


def load(path: Path) -> tuple[dict, dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(machine info, group -> impl -> median seconds, group -> impl -> first-call seconds)."""
    data = json.loads(path.read_text())
    medians, first = defaultdict(dict), defaultdict(dict)
    for bench in data["benchmarks"]:
        params = bench["params"]
        impl = params.get("impl") or params["setup"]
        medians[bench["group"]][impl] = bench["stats"]["median"]
        first[bench["group"]][impl] = bench["extra_info"].get("first_call_s", float("nan"))
    return {**data["machine_info"], "datetime": data.get("datetime", "")}, medians, first


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def group_table(group: str, times: dict[str, float], first: dict[str, float]) -> list[str]:
    header = "| impl | median ms | vs eager | vs compile | first call s |"
    lines = [f"### {group}", "", header, "|---|---:|---:|---:|---:|"]
    for impl in (i for i in ORDER if i in times):
        t = times[impl]
        vs_eager = times["eager"] / t if "eager" in times else float("nan")
        vs_compile = times["compile"] / t if "compile" in times else float("nan")
        lines.append(f"| {impl} | {t * 1e3:.3f} | {vs_eager:.2f}x | {vs_compile:.2f}x | {first[impl]:.1f} |")
    return [*lines, ""]


def summary(medians: dict[str, dict[str, float]]) -> list[str]:
    """Geometric-mean speed-ups of each fused impl over eager and compile, per kind of group."""
    kinds = defaultdict(list)
    for group, times in medians.items():
        kinds[group.split(" B=")[0]].append(times)
    lines = ["| benchmark | impl | vs eager | vs compile | groups |", "|---|---|---:|---:|---:|"]
    for kind, groups in kinds.items():
        for impl in ORDER[1:]:
            rows = [g for g in groups if impl in g and "eager" in g]
            if not rows:
                continue
            vs_eager = geomean([g["eager"] / g[impl] for g in rows])
            vs_compile = geomean([g["compile"] / g[impl] for g in rows if "compile" in g])
            lines.append(f"| {kind} | {impl} | {vs_eager:.2f}x | {vs_compile:.2f}x | {len(rows)} |")
    return lines


def report(path: Path, command: str) -> str:
    machine, medians, first = load(path)
    lines = [
        f"# askd benchmarks: {machine.get('device', '?')}",
        "",
        f"- machine: {machine.get('cpu_model', '?')}; {machine.get('threads', '?')} torch threads",
        f"- torch {machine.get('torch', '?')}; askd._C: {machine.get('askd_ext', '?')}",
        f"- batch {machine.get('batch', '?')}, {machine.get('dtype', '?')}; run {machine.get('datetime', '')}",
        f"- command: `{command}`",
        f"- raw data: `{path.name}` (pytest-benchmark JSON); times are medians, ratios are eager / impl",
        "",
        "## Summary (geometric means over the groups)",
        "",
        *summary(medians),
        "",
        "## Per group",
        "",
    ]
    for group in sorted(medians):
        lines += group_table(group, medians[group], first[group])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, help="markdown file (default: the JSON path with .md)")
    parser.add_argument("--command", default="pytest bench/ --benchmark-only", help="the command that made the JSON")
    args = parser.parse_args()
    if not args.json.is_file():
        parser.error(f"no such file: {args.json}")
    out = args.out or args.json.with_suffix(".md")
    out.write_text(report(args.json, args.command) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
