"""Where a run executes: the device, its autocast, and what this machine has (CUDA card, host RAM,
the optional libraries a recipe needs). The planner stays analytic; these probes feed it values."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from onecard.errors import UsageError
from onecard.recipe import Recipe


def resolve_device(name: str) -> str:
    """'auto' -> cuda where PyTorch sees a card, else cpu; a card asked for and absent is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but this PyTorch sees no CUDA GPU: use --device cpu, "
                         "or install the CUDA build of PyTorch (see README)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}: use cpu, cuda or auto")
    return name


def use_threads(threads: int | None, device: str) -> None:
    """--threads: PyTorch's threads per operation where a run computes on the CPU (None: PyTorch's
    default, one per core). With other work on the cores, threads that wait for each other at every
    operation can make a step many times slower than one thread."""
    if threads and device == "cpu":
        torch.set_num_threads(threads)


def autocast_for(device: str) -> AbstractContextManager:
    """bf16 autocast on CUDA as nanochat does; plain float32 on the CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def local_card() -> tuple[str, int, int, tuple[int, int]] | None:
    """(name, total bytes, bytes other processes hold, compute capability) of the CUDA card this
    process uses, or None without one. Others (a desktop's display, another program) hold what the
    card has in use less this process's own: what PyTorch reserved and its context, taken at the
    planner's assumed size."""
    if not torch.cuda.is_available():
        return None
    from onecard.plan.assumptions import DEFAULT

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    own = torch.cuda.memory_reserved(index) + DEFAULT.cuda_context_bytes
    return props.name, props.total_memory, max(0, total - free - own), (props.major, props.minor)


def host_memory_available() -> int | None:
    """Bytes of host RAM free for this process of a new run (Linux MemAvailable, shared by the ranks
    torchrun starts on this machine), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except (OSError, ValueError):
        pass
    return None


def unrunnable_reason(recipe: Recipe, device: str) -> str | None:
    """Why this machine cannot execute `recipe` on `device` (a library missing, no CUDA), or None."""
    if recipe.matmul == "fp8":
        from onecard.fp8 import fp8_unavailable_reason
        reason = fp8_unavailable_reason(device)
        if reason:
            return reason
    if recipe.loss == "fused":
        from onecard.loss import fused_loss_function
        try:
            fused_loss_function(torch.device(device))
        except UsageError as error:
            return str(error)
    return None


def card_peak_flops(device: str) -> tuple[str | None, float | None]:
    """(card name, dense bf16 peak FLOP/s) of the CUDA card; (None, None) on the CPU. The peak is
    None for a card the planner's catalog does not know: MFU is then not reported."""
    card = local_card() if device == "cuda" else None
    if card is None:
        return None, None
    from onecard.plan.catalog import find_gpu
    try:
        gpu, _ = find_gpu(card[0])
    except UsageError:
        return card[0], None
    return card[0], gpu.peak_bf16
