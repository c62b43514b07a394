"""askd.train's step in DistributedDataParallel: the DDP settings it uses, and the scaling over processes.

    python -m bench.ddp [--arch ir_tiny_cbam] [--batch 64] [--steps 8] [--repeat 1] [--nproc 2] [--out FILE.json]

Each set-up is a fresh ``torchrun --standalone --nproc_per_node=N -m bench.ddp --worker ...`` launch that times
``Trainer.train_step`` of an A-SKD student (frozen teacher forward on HR, student forward and backward on LR,
the gradient all-reduce, SGD), with the models built as ``askd.train`` builds them (``--fused``), on one
global batch of ``--batch`` split over the processes; the median of ``--steps`` steps after 2 warm-up steps.
With ``--repeat R`` every set-up is launched R times, the set-ups interleaved (a shared machine that slows down
for a while then slows them all), and its figure is the median of its R launches.

- ``settings``: every combination of ``static_graph`` and ``gradient_as_bucket_view`` at 25 MiB buckets, and
  bucket sizes 1, 5, 100 MiB with askd's choice (:data:`askd.train.trainer.DDP_STATIC_GRAPH`, ...).
- ``scaling``: the 1-process step on 1 thread and on N threads against N processes of 1 thread (askd's
  settings): efficiency = T(1 process, 1 thread) / (N * T(N processes)); on a CPU the N processes share the
  machine's N cores as the N threads of one process would.
Not part of ``pytest bench/``: it starts processes; its results go to ``bench/results/ddp-*.json`` and the
README's "Many GPUs, many nodes".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [  # (static_graph, gradient_as_bucket_view, bucket MiB)
    (False, False, 25.0), (True, False, 25.0), (False, True, 25.0), (True, True, 25.0),
    (True, True, 1.0), (True, True, 5.0), (True, True, 100.0),
]


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: time the step, rank 0 prints one JSON line."""
    import torch

    from askd import distributed
    from askd.config import Config
    from askd.losses import build
    from askd.train import Phase, Trainer, build_model, freeze, random_flips, to_input
    from askd.train import trainer as trainer_module

    trainer_module.DDP_STATIC_GRAPH, trainer_module.DDP_GRADIENT_AS_BUCKET_VIEW = args.static, args.view
    world, device = distributed.setup(torch.device("cpu"))
    cfg = Config(arch=args.arch, batch_size=args.batch, method="askd", fused=True, ddp_bucket_mb=args.bucket)
    classes = 100
    teacher, head = freeze(*build_model(cfg, cfg.arch, classes, device))
    t = Trainer.create(cfg, Phase("student", build("askd", cfg, classes), cfg.arch, teacher, head), classes, 1000,
                       device, world)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 112, 112), dtype=torch.uint8, generator=g)[world.share(args.batch)]
    labels = torch.randint(0, classes, (args.batch,), generator=g)[world.share(args.batch)]
    times = []
    for i in range(args.steps + 2):
        distributed.barrier()
        start = time.perf_counter()
        hr = to_input(images, device, random_flips(args.batch, 0, i)[world.share(args.batch)], False)
        t.train_step(hr, labels)
        distributed.barrier()
        times.append(time.perf_counter() - start)
    if world.main:
        print(json.dumps({"step_s": statistics.median(times[2:]), "processes": world.size,
                          "threads": torch.get_num_threads()}))
    distributed.teardown()


def launch(args: argparse.Namespace, nproc: int, threads: int, static: bool, view: bool, bucket: float) -> dict:
    """One torchrun launch of :func:`worker`; its JSON line with the set-up added."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "bench.ddp", "--worker", "--arch", args.arch, "--batch", str(args.batch), "--steps", str(args.steps),
           "--bucket", str(bucket), *(["--static"] if static else []), *(["--view"] if view else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        sys.exit(f"bench.ddp: a launch failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(static_graph=static, gradient_as_bucket_view=view, bucket_mb=bucket)
    print(f"  {nproc} x {threads} thread(s), static_graph={static}, bucket_view={view}, bucket {bucket:g} MiB: "
          f"{1000 * row['step_s']:.0f} ms/step", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ir_tiny_cbam")
    p.add_argument("--batch", type=int, default=64, help="the global batch")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="launches of every set-up, interleaved")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--view", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bucket", type=float, default=25.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from askd.train.trainer import DDP_GRADIENT_AS_BUCKET_VIEW, DDP_STATIC_GRAPH

    n, ours = args.nproc, (DDP_STATIC_GRAPH, DDP_GRADIENT_AS_BUCKET_VIEW)
    print(f"bench.ddp: {args.arch}, global batch {args.batch}, A-SKD student step, {n} processes (gloo)")
    setups = [(n, 1, *s) for s in SETTINGS] + [(1, threads, *ours, 25.0) for threads in (1, n)]
    rounds = [[launch(args, *setup) for setup in setups] for _ in range(args.repeat)]
    rows = []
    for i in range(len(setups)):
        runs = [r[i] for r in rounds]
        rows.append({**runs[0], "step_s": statistics.median(r["step_s"] for r in runs),
                     "launches_s": [r["step_s"] for r in runs]})
    settings, one = rows[:len(SETTINGS)], rows[len(SETTINGS):]
    ddp = next(r for r in settings if (r["static_graph"], r["gradient_as_bucket_view"], r["bucket_mb"]) == (*ours, 25))
    scaling = {"one_process_1_thread_s": one[0]["step_s"], f"one_process_{n}_threads_s": one[1]["step_s"],
               f"{n}_processes_s": ddp["step_s"], "efficiency": one[0]["step_s"] / (n * ddp["step_s"]),
               f"speedup_over_{n}_threads": one[1]["step_s"] / ddp["step_s"]}
    print(json.dumps(scaling, indent=2))
    if args.out:
        report = {"arch": args.arch, "batch": args.batch, "steps": args.steps, "repeat": args.repeat, "nproc": n,
                  "settings": settings,
                  "one_process": one, "scaling": scaling}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
