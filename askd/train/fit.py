"""Train one model of a run to its end: the loop over batches, its log, its checkpoints, its resume.

A phase's folder (``Phase.dirname``) holds ``checkpoint.pt`` (atomic, each epoch end and every
``checkpoint_every`` steps) and ``metrics.jsonl`` (one line every ``log_every`` steps: loss terms, training
accuracy, learning rate, images/s; and one per ``eval_every`` verification; each line names its ``phase``).
``--resume`` continues from the checkpoint exactly: same batches, flips, dropout draws, weights and method state.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import replacing
from ..checkpoint import load, save_atomic
from ..config import Config
from ..data import degrade
from ..data.sources import TrainData, iterate_batches
from ..eval.report import verify_sets
from .trainer import Phase, Trainer, random_flips, to_input


def fit(cfg: Config, phase: Phase, data: TrainData, device: torch.device) -> Path:
    """Train one model (resuming from its checkpoint with ``--resume``); returns the checkpoint path."""
    ckpt_path = Path(cfg.out) / phase.dirname / "checkpoint.pt"
    spe = data.steps_per_epoch(cfg.batch_size)
    t = Trainer.create(cfg, phase, data.num_classes, spe, device)
    total = cfg.epochs * spe if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * spe)
    if cfg.resume and ckpt_path.is_file():
        t.restore(load(ckpt_path))
        if t.step >= total:
            print(f"[{phase.dirname}] already trained ({t.step} steps): {ckpt_path}")
            return ckpt_path
        print(f"[{phase.dirname}] resuming at step {t.step} of {total}")
        forget_steps_after(ckpt_path.parent / "metrics.jsonl", t.step)
    elif ckpt_path.exists():  # the pipeline refuses this; a direct caller of fit gets the old checkpoint replaced
        print(f"[{phase.dirname}] starting afresh, replacing {ckpt_path} (use --resume to continue it)")
        ckpt_path.unlink()
    elif cfg.resume:
        print(f"[{phase.dirname}] no checkpoint to resume, training from step 0")
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    t.model.train()
    t.head.train()
    bar = tqdm(total=total, initial=t.step, desc=phase.dirname, unit="step", dynamic_ncols=True, mininterval=1.0)
    with open(ckpt_path.parent / "metrics.jsonl", "a") as log:
        t0, seen = time.perf_counter(), 0
        while t.step < total:
            epoch = t.step // spe
            for images, labels in iterate_batches(data, cfg, epoch, t.step % spe):
                hr = to_input(images, device, random_flips(len(labels), cfg.seed, t.step), cfg.channels_last)
                terms = t.train_step(hr, labels.to(device))
                seen += len(labels)
                bar.update()
                if t.step % cfg.log_every == 0 or t.step == total:
                    # reading the loss syncs the device: only at log steps
                    rate = seen / (time.perf_counter() - t0)
                    row = log_step(log, phase, t.step, epoch, terms, t.sched.get_last_lr()[0], rate)
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"[{phase.dirname}] loss became {row['loss']} at step {t.step}")
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
                if cfg.eval_every > 0 and t.step % cfg.eval_every == 0:
                    t0 += log_eval(log, bar, cfg, phase, t, data, device)  # images/s counts training time only
                if cfg.checkpoint_every > 0 and t.step % cfg.checkpoint_every == 0:
                    save_atomic(t.state(epoch), ckpt_path)
                if t.step >= total:
                    break
            save_atomic(t.state(t.step // spe), ckpt_path)
    bar.close()
    return ckpt_path


def forget_steps_after(log_path: Path, step: int) -> None:
    """Drop the metrics lines of steps after ``step`` (those an interrupted run logged past its last
    checkpoint): the resumed run trains and logs them again, and each step should appear once.

    Lines of older versions name their phase ``stage``: they are renamed ``phase`` so that the resumed
    run's file reads one way."""
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines]
    kept = [{("phase" if k == "stage" else k): v for k, v in row.items()} for row in rows if row["step"] <= step]
    if kept != rows:
        with replacing(log_path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))


def log_step(log, phase: Phase, step: int, epoch: int, terms: dict, lr: float, rate: float) -> dict:
    """Append one metrics line (loss terms, training accuracy, learning rate ``lr``, images/s); returns it."""
    row = {"phase": phase.dirname, "step": step, "epoch": epoch, "lr": lr, "img_per_s": round(rate, 2)}
    row.update({k: round(v.item(), 6) for k, v in terms.items()})
    log.write(json.dumps(row) + "\n")
    log.flush()
    return row


def log_eval(log, bar, cfg: Config, phase: Phase, t: Trainer, data: TrainData, device: torch.device) -> float:
    """Verify the model in training on every set of ``data`` (HR for the teacher and the assistant, LR for
    students) and log it; returns the seconds it took.

    The model runs in eval mode and goes back to training mode; no random draw is taken, so a run with
    evaluations follows the same path as one without."""
    start = time.perf_counter()
    side = cfg.low_res_side() if phase.low_res_input else None
    transform = None if side is None else (lambda x: degrade(x, side, cfg.variant))
    accs = {name: r["accuracy"] for name, r in verify_sets(t.model, data.eval_sets, cfg.eval_protocol, transform,
                                                           device).items()}
    row = {"phase": phase.dirname, "step": t.step, "eval": {k: round(v, 6) for k, v in accs.items()}}
    log.write(json.dumps(row) + "\n")
    log.flush()
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items())
    bar.write(f"[{phase.dirname}] step {t.step}: verification ({'HR' if side is None else f'LR {side} px'}) {shown}")
    return time.perf_counter() - start
