"""End-of-run evaluation for ``askd.train``: verification accuracies and attention correlations, and their table.

On pairs from the held-out identities (10 folds, flip TTA, DESIGN.md section 6): the teacher on HR, the
teacher on LR (what a model trained on HR alone gets) and every student on LR; for every student, the
per-block Pearson correlation between the teacher's maps on HR and the student's maps on LR.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..data import degrade
from .attention import attention_correlation
from .verification import evaluate_pairs, make_pairs


def possible_pairs(labels: torch.Tensor, wanted: int) -> int:
    """The largest even pair count <= ``wanted`` that has as many genuine pairs as it needs (half)."""
    genuine = sum(n * (n - 1) // 2 for n in Counter(labels.tolist()).values())
    return min(wanted, 2 * genuine) // 2 * 2


def evaluate_run(cfg, data, teacher: torch.nn.Module, students: dict[str, torch.nn.Module], device) -> dict:
    """Results dict: pair count, protocol, LR size, accuracies (mean, std) and per-student correlations."""
    images, labels = data.eval_images, data.eval_labels
    num_pairs = possible_pairs(labels, cfg.eval_pairs)
    idx_a, idx_b, issame = make_pairs(labels, num_pairs, seed=cfg.seed)
    side = cfg.lr_side()

    def to_lr(x: torch.Tensor) -> torch.Tensor:
        return degrade(x, side, cfg.variant)

    def verify(model, transform) -> dict:
        r = evaluate_pairs(model, images, idx_a, idx_b, issame, cfg.eval_protocol, transform, device=device)
        return {"accuracy": r["accuracy"], "std": r["std"]}

    rows = {"teacher (HR)": verify(teacher, None), "teacher (LR)": verify(teacher, to_lr)}
    correlations = {}
    for method, student in students.items():
        rows[f"student {method} (LR)"] = verify(student, to_lr)
        correlations[method] = attention_correlation(teacher, student, images, to_lr, device=device)
    return {
        "protocol": cfg.eval_protocol, "pairs": num_pairs, "lr_size": side, "variant": cfg.variant,
        "arch": cfg.arch, "data": cfg.data, "verification": rows, "attention_correlation": correlations,
    }


def format_table(results: dict) -> str:
    """Markdown tables of the results dict: verification accuracy, then correlation per block."""
    lines = [
        f"Verification on {results['pairs']} held-out pairs ({results['protocol']} protocol, 10 folds, flip TTA), "
        f"{results['arch']} / {results['variant']}, LR = {results['lr_size']} px",
        "",
        "| model | accuracy (%) | std (%) |",
        "|---|---|---|",
    ]
    for name, r in results["verification"].items():
        lines.append(f"| {name} | {100 * r['accuracy']:.2f} | {100 * r['std']:.2f} |")
    corr = results["attention_correlation"]
    if corr:
        blocks = [c["block"] for c in next(iter(corr.values()))]
        lines += ["", "Pearson r, teacher maps on HR vs student maps on LR (S = spatial, C = channel)", ""]
        lines.append("| student | " + " | ".join(f"B{b + 1}-S | B{b + 1}-C" for b in blocks) + " | mean S | mean C |")
        lines.append("|---" * (2 * len(blocks) + 3) + "|")
        for method, per_block in corr.items():
            cells = " | ".join(f"{c['spatial_r']:.2f} | {c['channel_r']:.2f}" for c in per_block)
            mean_s = sum(c["spatial_r"] for c in per_block) / len(per_block)
            mean_c = sum(c["channel_r"] for c in per_block) / len(per_block)
            lines.append(f"| {method} | {cells} | {mean_s:.2f} | {mean_c:.2f} |")
    return "\n".join(lines)
