"""Data-parallel training on several cards, started by torchrun.

    torchrun --nproc_per_node 2 -m onecard.cli train --model d20 ...

Every rank holds the whole model (any recipe); the optimizer states are sharded: each parameter
has one owner rank (recipe.shard_owners) that alone keeps its states and master copy. Each
optimizer step, the ranks take turns through the one token stream (rank r trains micro-batches
r, r+N, r+2N, ...), so the step sees the same --total-batch tokens it would on one card and the
loader's position is the same on every rank; then each gradient is averaged onto its owner, the
owner updates the parameter and sends the new weight to the others. A checkpoint gathers every
state onto rank 0, which alone writes the run directory and prints.

Each rank tokenizes the whole stream and keeps its share: simple, and the loader state stays one
state, but the CPU work grows with the number of ranks. At the few thousand tokens per second a
consumer card trains, that is negligible; at datacenter speeds a sharded loader would be needed.

No torch DistributedDataParallel wrapper: the recipes keep gradients in their own buffers
(bf16, or fp32 in CPU RAM), which are summed in place once per step, so there is no second
copy of the gradients in buckets. Tensors in CPU RAM go through a gloo group when the main
backend is NCCL.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from onecard.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    cpu_group: object | None = None  # gloo, for tensors in CPU RAM when the main backend is NCCL

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()
# How long a rank waits in a collective for the others. Rank 0 alone trains the tokenizer and writes
# checkpoints, which on a large corpus or a slow disk take longer than NCCL's default of 10 minutes
# (pytorch/pytorch#110947);
# a rank that dies is noticed by torchrun at once, so only a hang waits this long.
WAIT = timedelta(hours=1)


# What torchrun sets for each rank beside WORLD_SIZE; torch.distributed's env:// rendezvous reads them.
RANK_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def _world_size() -> int:
    """WORLD_SIZE as torchrun sets it; one line, not torch's traceback, when a shell or a scheduler left
    it behind without the rest."""
    raw = os.environ.get("WORLD_SIZE", "1")
    size = int(raw) if raw.strip().isdigit() else 0
    if size < 1:
        raise UsageError(f"WORLD_SIZE={raw!r} is not a number of processes: unset it, or start the ranks with "
                         "torchrun")
    missing = [name for name in RANK_VARIABLES if name not in os.environ]
    if size > 1 and missing:
        raise UsageError(f"WORLD_SIZE={raw} is set but {', '.join(missing)} not: start the ranks with torchrun "
                         "(torchrun --standalone --nproc_per_node N -m onecard.cli ...), or unset WORLD_SIZE")
    return size


def init(device: str) -> World:
    """Join the torchrun job this process belongs to, or return SINGLE when there is none."""
    size = _world_size()
    if size == 1:
        return SINGLE
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=WAIT)
    cpu_group = dist.new_group(backend="gloo", timeout=WAIT) if dist.get_backend() == "nccl" else None
    return World(dist.get_rank(), dist.get_world_size(), cpu_group)


def _group(world: World, tensor: torch.Tensor):
    return world.cpu_group if tensor.device.type == "cpu" and world.cpu_group is not None else None


def average_onto(tensors: list[tuple[torch.Tensor, int]], world: World) -> None:
    """Each tensor summed over the ranks onto its owner rank and divided there by the number of
    ranks, in place (the others keep their own partial sums, which they then discard)."""
    works = [dist.reduce(t, dst=owner, group=_group(world, t), async_op=True) for t, owner in tensors]
    for work in works:
        work.wait()
    for t, owner in tensors:
        if owner == world.rank:
            t.div_(world.size)


def broadcast_from(tensors: list[tuple[torch.Tensor, int]], world: World) -> None:
    """Each tensor from its owner rank to every other, in place."""
    works = [dist.broadcast(t, src=owner, group=_group(world, t), async_op=True) for t, owner in tensors]
    for work in works:
        work.wait()


def sum_on_host(value: torch.Tensor, world: World) -> torch.Tensor:
    """A CPU tensor summed over the ranks (through the gloo group when the main backend is NCCL)."""
    value = value.clone()
    dist.all_reduce(value, group=_group(world, value))
    return value


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


def onto_rank0(value, owner: int, world: World):
    """Rank 0's copy of a value the `owner` rank holds (its tensors arrive in CPU memory); None on
    every other rank. Only rank 0 and the owner take part: call it in the same order on every rank."""
    if owner == 0:
        return value if world.main else None
    group = world.cpu_group  # objects travel as CPU bytes: gloo's group when the main backend is NCCL
    if world.rank == owner:
        dist.send_object_list([_on_cpu(value)], dst=0, group=group)
        return None
    if world.main:
        box = [None]
        dist.recv_object_list(box, src=owner, group=group)
        return box[0]
    return None


def mean(value: float, world: World, device: str) -> float:
    """The mean of a number over the ranks (a loss, for the log)."""
    return value if world.size == 1 else total(value, world, device) / world.size


def total(value: float | None, world: World, device: str) -> float | None:
    """The sum of a number over the ranks (each card's energy); None when a rank has none."""
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return None if t.isnan().item() else t.item()


def any_rank(flag: bool, world: World, device: str) -> bool:
    """True on every rank when it is true on one (a stop request reaches one rank first)."""
    if world.size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank0(value, world: World):
    """Rank 0's value of something each rank computed on its own (a time-stamped path, say)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_rank0(decide: Callable[[], object], world: World):
    """What rank 0 decides from files another rank could see change under it (rank 0 sets a damaged
    checkpoint aside, say), for every rank. A UsageError on rank 0 stops every rank: rank 0 with its
    reason, the others quietly, as held_by_rank0."""
    value, refused = None, None
    if world.main:
        try:
            value = decide()
        except UsageError as error:
            refused = str(error)
    value, refused = from_rank0((value, refused), world)
    if refused is not None:
        if world.main:
            raise UsageError(refused)
        raise SystemExit(2)
    return value


@contextmanager
def held_by_rank0(make_lock: Callable[[], AbstractContextManager], world: World) -> Iterator[None]:
    """Rank 0 takes a lock (the run directory's) for every rank. When it cannot, every rank stops: rank 0
    with its reason, the others quietly; they would otherwise die in their next collective with a traceback."""
    with ExitStack() as stack:
        decided_by_rank0(lambda: stack.enter_context(make_lock()) and None, world)
        yield


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
