"""Measuring this machine: the practical matmul peak, and a recipe's own training step (its
model, optimizer and step function, as the trainer runs them) on synthetic batches. Used by
`onecard bench` and the scripts in benchmarks/."""

from __future__ import annotations

import gc
import time

import torch

from onecard.family import build_model, build_optimizer
from onecard.model import GPTConfig
from onecard.recipe import Recipe
from onecard.step import OutOfMemory, Snapshot, TrainStep


def _sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_flops(device: str, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Achieved FLOP/s of size x size x size matmuls (2 n^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm up kernels and clocks
        a @ b
    start = _sync(device)
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (_sync(device) - start)


class SyntheticBatches:
    """The same random (inputs, targets) every micro-batch: speed does not depend on the text."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, device: str) -> None:
        generator = torch.Generator().manual_seed(0)
        idx = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=generator).to(device)
        self.inputs, self.targets = idx[:, :-1], idx[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def time_recipe_steps(config: GPTConfig, recipe: Recipe, accum: int, steps: int, device: str,
                      total_batch: int | None = None) -> dict:
    """`steps` optimizer steps of `accum` micro-batches with the recipe's own TrainStep; the time of
    the last one split into forward-backward and update, its peak memory, and its tokens/s scaled
    to a step of `total_batch` tokens (forward-backward per token × total_batch + one update)."""
    cuda = device == "cuda"
    model = opt = None
    try:
        torch.manual_seed(0)
        model = build_model(config, device=device)
        model.set_policies(recipe.activations, recipe.loss)
        opt = build_optimizer(model, recipe)  # casts weights as the recipe says (wte bf16 on CUDA)
        fell_back: list[str] = []  # a compile that failed runs eager: the row must not pass for compiled
        step = TrainStep(model, opt, device, compile_model=recipe.compile, on_compile_failed=fell_back.append)
        batches = SyntheticBatches(config.vocab_size, recipe.micro_batch, recipe.seq_len, device)
        first_s = None
        for _ in range(steps - 1):  # warm-up: kernels, compile, the optimizer states
            started = _sync(device)
            step(batches, accum)
            first_s = first_s or _sync(device) - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = _sync(device)
        snapshot = Snapshot(batches)
        loss = step.forward_backward(batches, accum, lambda: False)
        middle = _sync(device)
        outcome = step.update(loss, snapshot)
        end = _sync(device)
        tokens = accum * recipe.micro_batch * recipe.seq_len
        total_batch = total_batch or tokens
        # a real step has total_batch tokens: forward-backward time scales with them, the update does not
        at_batch_s = (middle - start) / tokens * total_batch + (end - middle)
        row = {"outcome": "ran", "step_s": end - start, "forward_backward_s": middle - start,
               "update_s": end - middle, "loss": outcome.loss, "tokens": tokens,
               "tokens_per_s": tokens / (end - start), "forward_backward_tokens_per_s": tokens / (middle - start),
               "total_batch": total_batch, "tokens_per_s_at_batch": total_batch / at_batch_s,
               "first_step_s": first_s, "compiled": recipe.compile and not fell_back}
        if fell_back:
            row["compile_failed"] = fell_back[0]
        if cuda:
            row |= {"max_memory_allocated": torch.cuda.max_memory_allocated(),
                    "max_memory_reserved": torch.cuda.max_memory_reserved()}
        return row
    except (torch.OutOfMemoryError, OutOfMemory) as error:  # the step's own: in a warm-up step or the update
        return {"outcome": "out of memory", "max_memory_allocated": torch.cuda.max_memory_allocated(),
                "error": str(error).splitlines()[0]}
    finally:
        del model, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
