"""End-of-run evaluation for ``askd.train --task classify``: top-1/top-5 accuracy and attention correlations.

On every validation split of the data (a Dataset of ``(uint8 image (3,S,S), label)``, its evaluation view: the
centre crop of an ImageNet-style folder, CIFAR's test images, the shapes set's val split), without test-time
augmentation: the teacher on HR, the teacher on LR (what a model trained on HR alone gets), every assistant on
HR and every student on LR, LR being ``transform`` of the HR batch (bicubic down and up). Then, as for faces,
the per-block Pearson correlation between the teacher's maps on HR and each student's on LR, over the first
:data:`CORRELATION_IMAGES` validation images.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.degrade import bicubic
from .attention import attention_correlation
from .embed import eval_mode, to_model_input
from .report import correlation_table, markdown_table

CORRELATION_IMAGES = 512
BATCH = 256


def topk_accuracy(model: torch.nn.Module, dataset: Dataset, transform=None, device="cpu", workers: int = 0,
                  k: int = 5) -> dict[str, float]:
    """``{"top1": share, "top5": share}`` of ``model`` (``model(x)[0]``: logits (B,N)) on ``dataset``, its images
    fed as [-1,1] through ``transform`` (or as they are); top-k with k capped at the number of classes."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    hits1 = hitsk = seen = 0
    with eval_mode(model), torch.inference_mode():
        for images, labels in loader:
            x = to_model_input(images).to(device)
            logits = model(x if transform is None else transform(x))[0]
            labels = labels.to(device)
            top = logits.topk(min(k, logits.shape[1]), dim=1).indices
            hits1 += (top[:, 0] == labels).sum().item()
            hitsk += (top == labels[:, None]).any(dim=1).sum().item()
            seen += len(labels)
    if seen == 0:
        raise ValueError("topk_accuracy: the validation set is empty")
    return {"top1": hits1 / seen, f"top{k}": hitsk / seen}


def first_images(dataset: Dataset, n: int) -> torch.Tensor:
    """The evaluation views of the first ``n`` items, uint8 (n,3,S,S)."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def top1_accuracies(cfg, model: torch.nn.Module, data, transform, device) -> dict[str, float]:
    """{split: top-1} of the model in training (``eval_every``)."""
    sets = data.eval_sets.items()
    return {name: topk_accuracy(model, ds, transform, device, cfg.workers)["top1"] for name, ds in sets}


def evaluate_run(cfg, data, teacher, students: dict, device, assistants: dict | None = None) -> dict:
    """Results dict: top-1/top-5 per split and model (``accuracy``: {"<split> top-1": {model: {"accuracy", "std":
    None}}}, the shape the face results' ``verification`` has), and per-student map correlations."""
    side = cfg.low_res_side()

    def to_low_res(x: torch.Tensor) -> torch.Tensor:
        return bicubic(x, side)

    models = {"teacher (HR)": (teacher, None), "teacher (LR)": (teacher, to_low_res)}
    models.update({f"assistant {method} (HR)": (a, None) for method, a in (assistants or {}).items()})
    models.update({f"student {method} (LR)": (student, to_low_res) for method, student in students.items()})
    accuracy = {}
    for split, dataset in data.eval_sets.items():
        scores = {name: topk_accuracy(m, dataset, tf, device, cfg.workers) for name, (m, tf) in models.items()}
        for k in ("top1", "top5"):
            accuracy[f"{split} top-{k[3:]}"] = {name: {"accuracy": s[k], "std": None} for name, s in scores.items()}
    images = first_images(next(iter(data.eval_sets.values())), CORRELATION_IMAGES)
    same_arch = not cfg.assistant or cfg.assistant == cfg.arch
    correlations = {m: attention_correlation(teacher, s, images, to_low_res, device=device)
                    for m, s in students.items() if same_arch}
    return {
        "task": "classify", "arch": cfg.arch, "variant": cfg.variant, "data": cfg.data,
        "input_size": cfg.input_side(), "low_res_size": side, "protocol": "top-k, no test-time augmentation",
        "images": {split: len(ds) for split, ds in data.eval_sets.items()},
        "accuracy": accuracy, "attention_correlation": correlations,
    }


def format_table(results: dict) -> str:
    """Markdown: top-1/top-5 % per model and split, then the correlation per block."""
    images = ", ".join(f"{split} {n}" for split, n in results["images"].items())
    cols, acc = list(results["accuracy"]), results["accuracy"]
    lines = [
        f"Validation images: {images} ({results['protocol']}), {results['arch']} / {results['variant']}, "
        f"HR {results['input_size']} px, LR = {results['low_res_size']} px (bicubic); accuracy %",
        "",
    ]
    lines += markdown_table(["model", *cols], [[model] + [f"{100 * acc[c][model]['accuracy']:.2f}" for c in cols]
                                               for model in acc[cols[0]]])
    if results["attention_correlation"]:
        lines += ["", correlation_table(results["attention_correlation"])]
    return "\n".join(lines)
