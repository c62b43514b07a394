"""Many processes: where this process stands in a ``torchrun`` launch, and the few collectives askd uses.

``python -m askd.train`` runs alone (no process group, no port) or under ``torchrun`` (torch.distributed
elastic), which starts the processes, runs the rendezvous and restarts the group when a worker dies; askd
reads what it set in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``TORCHELASTIC_RESTART_COUNT``) and starts the process group: gloo on CPU, nccl on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``). There is no launcher or rendezvous of askd's own.

Every collective here is a no-op in one process, so the training code calls them without asking.
A leaf module (torch only): the methods (HORKD's class centres) and the training loop both use it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

# fault injection, to check a cluster's restart set-up: "RANK:STEP" makes that rank kill itself with SIGKILL
# after its optimiser step STEP, in the first attempt only (a restarted group runs on)
FAULT_ENV = "ASKD_KILL_AT_STEP"


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its node, and ``restart``, the
    number of times torchrun has restarted the group (0 in a first attempt and in a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restart: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes: logs, checkpoints, evaluation and results are rank 0's."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (a multiple of ``size``): contiguous, in rank order, so
        that the ranks' shares concatenated are the global batch."""
        if n % self.size:
            raise ValueError(f"a global batch of {n} does not split over {self.size} processes")
        b = n // self.size
        return slice(self.rank * b, (self.rank + 1) * b)


SINGLE = World()  # one process, no group: the default of every function that takes a World


def from_env() -> World:
    """The World torchrun describes in the environment; a single process when it describes none."""
    env = os.environ
    try:
        return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE, LOCAL_RANK must be integers (set by torchrun): {e}") from None


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Start the process group when launched by torchrun with more than one process (idempotent) and return
    (world, this process's device): on CUDA ``cuda:LOCAL_RANK``; ``device`` as it is otherwise."""
    world = from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # nccl needs its device named up front
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(world),
                                rank=world.rank, world_size=world.size,
                                device_id=device if device.type == "cuda" else None)
    return world, device


def attempt_store(world: World) -> dist.Store | None:
    """The rendezvous store of this attempt of the group; None for torch's own env:// set-up.

    Under torchrun's default the workers share the elastic agent's TCPStore (``TORCHELASTIC_USE_AGENT_STORE``),
    which outlives a restart at the same address: in torch 2.13 the restarted workers then read the previous
    attempt's keys, and gloo connects to the dead workers' ports ("Gloo connectFullMesh failed ... Connection
    refused"; pytorch/pytorch#135712). Keys prefixed with the restart count keep each attempt to its own.
    Without the agent store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 hosts a fresh store per
    attempt, as env:// does."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, is_master=False)
    return dist.PrefixStore(f"askd/attempt_{world.restart}", client)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether collectives run: a process group of more than one process."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalar tensors averaged over the processes (one all-reduce for all of them), float32 on their device."""
    if not active() or not values:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(values, stacked.unbind(), strict=True))


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true in any process; every process gets the same answer."""
    if not active():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """The processes' ``x`` (the same shape in each) concatenated along dim 0 in rank order, without gradient:
    a batch-wise quantity of the global batch. ``x`` itself in one process."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def maybe_fail(step: int, world: World) -> None:
    """SIGKILL this process after ``step`` when ``$ASKD_KILL_AT_STEP`` names this rank and step, in the first
    attempt of the group only: the fault torchrun --max-restarts recovers from (see README)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or world.restart > 0:
        return
    rank, _, at = spec.partition(":")
    if int(rank) == world.rank and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
