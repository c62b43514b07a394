"""End-of-run evaluation for ``askd.train``: verification accuracies and attention correlations, and their table.

On every verification set of the data (held-out identities or .bin files; 10 folds, flip TTA, DESIGN.md
section 6): the teacher on HR, the teacher on LR (what a model trained on HR alone gets), every HORKD
assistant on HR and every student on LR; for every student of the teacher's architecture, the per-block
Pearson correlation between the teacher's maps on HR and the student's maps on LR, over the images of the
first set (a student of another architecture, through an assistant, has other blocks to compare).
"""

from __future__ import annotations

import torch

from ..data import degrade
from .attention import attention_correlation
from .verification import evaluate_pairs


def verify_sets(model: torch.nn.Module, sets: dict, protocol: str, transform, device) -> dict[str, dict]:
    """{set name: {"accuracy", "std"}} of ``model`` on each :class:`askd.data.sources.PairSet`."""
    out = {}
    for name, pairs in sets.items():
        r = evaluate_pairs(model, pairs.images, pairs.idx_a, pairs.idx_b, pairs.issame, protocol, transform,
                           device=device)
        out[name] = {"accuracy": r["accuracy"], "std": r["std"]}
    return out


def verify_accuracies(cfg, model: torch.nn.Module, data, transform, device) -> dict[str, float]:
    """{set name: accuracy} of the model in training on every verification set (``eval_every``)."""
    return {name: r["accuracy"] for name, r in verify_sets(model, data.eval_sets, cfg.eval_protocol, transform,
                                                             device).items()}


def evaluate_run(
    cfg, data, teacher: torch.nn.Module, students: dict[str, torch.nn.Module], device,
    assistants: dict[str, torch.nn.Module] | None = None,
) -> dict:
    """Results dict: protocol, LR size, {set: {model: accuracy, std}}, per-student correlations."""
    side = cfg.low_res_side()

    def to_low_res(x: torch.Tensor) -> torch.Tensor:
        return degrade(x, side, cfg.variant)

    models = {"teacher (HR)": (teacher, None), "teacher (LR)": (teacher, to_low_res)}
    models.update({f"assistant {method} (HR)": (a, None) for method, a in (assistants or {}).items()})
    models.update({f"student {method} (LR)": (student, to_low_res) for method, student in students.items()})
    rows = {name: verify_sets(m, data.eval_sets, cfg.eval_protocol, tf, device) for name, (m, tf) in models.items()}
    images = next(iter(data.eval_sets.values())).images
    same_arch = not cfg.assistant or cfg.assistant == cfg.arch
    correlations = {
        m: attention_correlation(teacher, s, images, to_low_res, device=device)
        for m, s in students.items() if same_arch
    }
    return {
        "protocol": cfg.eval_protocol, "pairs": {name: len(p) for name, p in data.eval_sets.items()},
        "low_res_size": side, "variant": cfg.variant, "arch": cfg.arch, "data": cfg.data,
        "verification": {name: {model: rows[model][name] for model in rows} for name in data.eval_sets},
        "attention_correlation": correlations,
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header row, the rule, a line per row (cells already formatted)."""
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def format_table(results: dict) -> str:
    """Markdown tables of the results dict: verification accuracy per set, then correlation per block."""
    pairs = ", ".join(f"{name} {n}" for name, n in results["pairs"].items())
    sets, acc = list(results["verification"]), results["verification"]
    lines = [
        f"Verification pairs: {pairs} ({results['protocol']} protocol, 10 folds, flip TTA), "
        f"{results['arch']} / {results['variant']}, LR = {results['low_res_size']} px; accuracy % (std over folds)",
        "",
    ]
    lines += markdown_table(["model", *sets], [[model] + [f"{100 * acc[s][model]['accuracy']:.2f} "
                                                          f"({100 * acc[s][model]['std']:.2f})" for s in sets]
                                               for model in acc[sets[0]]])
    if results["attention_correlation"]:
        lines += ["", correlation_table(results["attention_correlation"])]
    return "\n".join(lines)


def correlation_table(correlations: dict[str, list[dict]]) -> str:
    """Markdown table of per-block Pearson r, one row per student: {method: attention_correlation(...)}."""
    blocks = [c["block"] for c in next(iter(correlations.values()))]
    header = ["student", *(f"B{b + 1}-{m}" for b in blocks for m in "SC"), "mean S", "mean C"]
    rows = []
    for method, per_block in correlations.items():
        cells = [f"{c[key]:.2f}" for c in per_block for key in ("spatial_r", "channel_r")]
        means = [f"{sum(c[key] for c in per_block) / len(per_block):.2f}" for key in ("spatial_r", "channel_r")]
        rows.append([method, *cells, *means])
    title = "Pearson r, teacher maps on HR vs student maps on LR (S = spatial, C = channel)"
    return "\n".join([title, "", *markdown_table(header, rows)])
