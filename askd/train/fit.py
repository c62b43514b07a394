"""Train one model of a run to its end: the loop over batches, its log, its checkpoints, its resume.

A phase's folder (``Phase.dirname``) holds ``checkpoint.pt`` (atomic, each epoch end and every
``checkpoint_every`` steps; the last ``keep_checkpoints`` as ``checkpoint-<step>.pt`` too) and ``metrics.jsonl``
(one line every ``log_every`` steps: loss terms averaged over the processes, training accuracy, learning rate,
images/s of the global batch; and one per ``eval_every`` verification; each line names its ``phase``).
``--resume`` continues from the newest checkpoint that loads, exactly: same batches, flips, dropout draws,
weights and method state, on any number of processes. A step with a non-finite loss is skipped; after
``max_bad_steps`` of them in a row the phase stops (:class:`TrainingDiverged`) and no checkpoint is written
during the streak.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import replacing
from ..checkpoint import kept as numbered_checkpoints
from ..checkpoint import load_newest, remove_checkpoints, save_checkpoint
from ..config import Config
from ..data.sources import TrainData, iterate_batches
from ..distributed import SINGLE, World, all_mean, barrier, maybe_fail
from .tasks import task_of
from .trainer import Phase, Trainer, random_flips, to_input


def kept_any(ckpt_path: Path) -> bool:
    """Whether a phase has a checkpoint: ``checkpoint.pt`` or a numbered one."""
    return ckpt_path.is_file() or bool(numbered_checkpoints(ckpt_path))


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``max_bad_steps`` steps in a row; the last good checkpoint is kept."""


def fit(cfg: Config, phase: Phase, data: TrainData, device: torch.device, world: World = SINGLE) -> Path:
    """Train one model (resuming from its newest checkpoint with ``--resume``); returns the checkpoint path.

    Under torchrun every process trains its share of each global batch; rank 0 alone logs and writes the
    checkpoints, and the others wait for the last one before they return (they load it next)."""
    ckpt_path = Path(cfg.out) / phase.dirname / "checkpoint.pt"
    spe = data.steps_per_epoch(cfg.batch_size)
    t = Trainer.create(cfg, phase, data.num_classes, spe, device, world)
    total = cfg.epochs * spe if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * spe)
    say = print if world.main else (lambda *_: None)
    if cfg.resume and kept_any(ckpt_path):
        ckpt, used = load_newest(ckpt_path)
        t.restore(ckpt)
        if t.step >= total:
            say(f"[{phase.dirname}] already trained ({t.step} steps): {used}")
            return ckpt_path
        say(f"[{phase.dirname}] resuming at step {t.step} of {total} from {used}")
        if world.main:
            forget_steps_after(ckpt_path.parent / "metrics.jsonl", t.step)
    elif kept_any(ckpt_path):  # the pipeline refuses this; a direct caller of fit gets the old checkpoints replaced
        say(f"[{phase.dirname}] starting afresh, replacing {ckpt_path} (use --resume to continue it)")
        if world.main:
            remove_checkpoints(ckpt_path)
    elif cfg.resume:
        say(f"[{phase.dirname}] no checkpoint to resume, training from step 0")
    barrier()  # rank 0 may have rewritten the log or removed checkpoints: nobody looks at them until here
    if world.main:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    t.model.train()
    t.head.train()
    loop(cfg, phase, t, data, device, total, ckpt_path)
    barrier()  # the last checkpoint is written before any process loads it
    return ckpt_path


def loop(cfg: Config, phase: Phase, t: Trainer, data: TrainData, device: torch.device, total: int,
         ckpt_path: Path) -> None:
    """The batches from ``t.step`` to ``total``: steps, log lines, evaluations and checkpoints (rank 0's)."""
    world, spe = t.world, data.steps_per_epoch(cfg.batch_size)
    share = world.share(cfg.batch_size)
    bar = tqdm(total=total, initial=t.step, desc=phase.dirname, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not world.main)
    with open(ckpt_path.parent / "metrics.jsonl", "a") if world.main else nullcontext() as log:
        t0, seen, bad = time.perf_counter(), 0, 0
        while t.step < total:
            epoch = t.step // spe
            for images, labels in iterate_batches(data, cfg, epoch, t.step % spe, share):
                flips = random_flips(cfg.batch_size, cfg.seed, t.step)[share]
                hr = to_input(images, device, flips, cfg.channels_last)
                terms, applied = t.train_step(hr, labels.to(device))
                bad = 0 if applied else bad + 1
                if bad:
                    check_streak(cfg, phase, t, bad, bar, ckpt_path)
                seen += cfg.batch_size
                bar.update()
                if t.step % cfg.log_every == 0 or t.step == total:
                    # reading the loss syncs the device: only at log steps; the terms averaged over the processes
                    terms = all_mean(terms)
                    if world.main:
                        rate = seen / (time.perf_counter() - t0)
                        row = log_step(log, phase, t.step, epoch, terms, t.sched.get_last_lr()[0], rate)
                        bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
                if cfg.eval_every > 0 and t.step % cfg.eval_every == 0 and world.main:
                    t0 += log_eval(log, bar, cfg, phase, t, data, device)  # images/s counts training time only
                if cfg.checkpoint_every > 0 and t.step % cfg.checkpoint_every == 0 and not bad:
                    save(t, epoch, ckpt_path, cfg)
                maybe_fail(t.step, world)
                if t.step >= total:
                    break
            if not bad:
                save(t, t.step // spe, ckpt_path, cfg)
    bar.close()


def save(t: Trainer, epoch: int, ckpt_path: Path, cfg: Config) -> None:
    """Rank 0 writes the checkpoint (atomically, keeping the last ``keep_checkpoints``)."""
    if t.world.main:
        save_checkpoint(t.state(epoch), ckpt_path, t.step, cfg.keep_checkpoints)


def check_streak(cfg: Config, phase: Phase, t: Trainer, bad: int, bar, ckpt_path: Path) -> None:
    """After a skipped step (``bad`` in a row): say so at the first, stop at ``max_bad_steps``."""
    if bad == 1 and t.world.main:
        bar.write(f"[{phase.dirname}] step {t.step}: loss or gradients not finite; step skipped, weights unchanged "
                  f"(stops after {cfg.max_bad_steps} such steps in a row: max_bad_steps)")
    if bad >= cfg.max_bad_steps:
        kept = f"the last good checkpoint {ckpt_path} is kept" if kept_any(ckpt_path) else "no checkpoint was written"
        raise TrainingDiverged(
            f"[{phase.dirname}] the loss was not finite for {bad} steps in a row (steps {t.step - bad + 1}-{t.step}, "
            f"max_bad_steps {cfg.max_bad_steps}); training stopped and {kept}. Lower lr, try another --amp, or "
            f"continue with --resume"
        )


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
    """Evaluate the model in training on every set of ``data`` (HR for the teacher and the assistant, LR for
    students; verification for faces, top-1 for classification) and log it; returns the seconds it took.

    The model runs in eval mode and goes back to training mode; no random draw is taken, so a run with
    evaluations follows the same path as one without."""
    start = time.perf_counter()
    task = task_of(cfg)
    transform = (lambda x: task.low_res(cfg, x)) if phase.low_res_input else None
    accs = task.evaluate_sets(cfg, t.model, data, transform, device)
    row = {"phase": phase.dirname, "step": t.step, "eval": {k: round(v, 6) for k, v in accs.items()}}
    log.write(json.dumps(row) + "\n")
    log.flush()
    shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items())
    seen = f"LR {cfg.low_res_side()} px" if phase.low_res_input else "HR"
    bar.write(f"[{phase.dirname}] step {t.step}: {task.eval_name} ({seen}) {shown}")
    return time.perf_counter() - start
