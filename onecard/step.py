"""One optimizer step of a recipe, the same for the trainer, `onecard bench` and benchmarks/:
forward-backward over the step's micro-batches, the gradient average across ranks, clipping and
the update; a snapshot of the step's start to rewind to; the out-of-memory and compile fallbacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from onecard import distributed, rng
from onecard.device import autocast_for
from onecard.distributed import SINGLE, World
from onecard.errors import one_line
from onecard.optim import Optimizers


class BatchSource(Protocol):
    """Where micro-batches come from: the token loader, or synthetic batches for a benchmark."""
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class OutOfMemory(Exception):
    """CUDA ran out of memory. `intact`: the weights are those of the last whole step (the step was
    rewound, or it was an evaluation), so they may be saved; False when the update was cut short."""

    def __init__(self, error: torch.OutOfMemoryError, intact: bool = True) -> None:
        super().__init__(one_line(error))
        self.intact = intact


@dataclass
class StepOutcome:
    loss: float | None  # mean loss of the micro-batches; None: the step was abandoned on a stop request
    grad_norm: float | None = None
    skipped: bool = False  # a non-finite loss or gradient norm skipped the update
    tokens: int = 0  # input tokens of the step, all ranks together
    compile_s: float | None = None  # the first compiled step: its forward-backward, compiling included

    @property
    def abandoned(self) -> bool:
        return self.loss is None


class Snapshot:
    """The RNG and data position at a step's start: rewinding makes the step as if never begun."""

    def __init__(self, batches: BatchSource) -> None:
        self.batches = batches
        self.rng = rng.rng_state()
        self.position = batches.state_dict()

    def rewind(self, opt: Optimizers) -> None:
        opt.zero_grad()
        rng.set_rng_state(*self.rng)
        self.batches.load_state_dict(self.position)


def compiled(model: torch.nn.Module, per_block: bool) -> torch.nn.Module:
    """The module a compiled step runs: the model compiled whole, or, where the recipe has hooks in
    backward (Recipe.backward_hooks), the model with each block compiled for its training forwards,
    whose backward then hands each block's gradients to the hooks as that block finishes instead of
    all of them at the end. Evaluation and sampling keep the plain blocks."""
    if not per_block:
        return torch.compile(uncompiled(model))  # not an earlier step's blocks (a model passed on)
    # the blocks share one compiled code; nanochat-2026's blocks differ (a value embedding or none, a
    # short or a long window), each variant static and then dynamic once SFT's widths vary: room for them
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    model.compiled_blocks = [torch.compile(block) for block in model.transformer.h]
    return model


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    model.compiled_blocks = None
    return model


def compile_error(error: Exception) -> bool:
    """An error of torch.compile itself (Dynamo or Inductor), not of the model or the card."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(error, TorchDynamoException) or type(error).__module__.startswith("torch._inductor")


class TrainStep:
    """A recipe's step on a model and its optimizer. `step_model` is the compiled module where the
    recipe compiles (it shares the model's parameters); a compile that fails on the first step
    falls back to the plain model and redoes the step."""

    def __init__(self, model: torch.nn.Module, opt: Optimizers, device: str, *, compile_model: bool = False,
                 grad_clip: float = 1.0, world: World = SINGLE,
                 on_compile_failed: Callable[[str], None] = lambda message: None) -> None:
        self.model, self.opt, self.device, self.world = model, opt, device, world
        self.grad_clip = grad_clip
        # uncompiled: a model passed on from an earlier stage may still hold that step's blocks
        self.step_model = compiled(model, opt.recipe.backward_hooks) if compile_model else uncompiled(model)
        self.compiled = compile_model
        self.trusted = not compile_model  # a compiled model that ran one step is trusted
        self.on_compile_failed = on_compile_failed

    def __call__(self, batches: BatchSource, accum: int, should_stop: Callable[[], bool] = lambda: False
                 ) -> StepOutcome:
        snapshot = Snapshot(batches)
        compiling, started = not self.trusted, time.perf_counter()
        try:
            loss = self.forward_backward(batches, accum, should_stop)
        except torch.OutOfMemoryError as error:
            raise self.out_of_memory(error, snapshot) from None
        except Exception as error:
            if isinstance(getattr(error, "inner_exception", None), torch.OutOfMemoryError):
                # the compiler ran out of memory (autotuning a recompile): the card is full, not the
                # compiler broken; running eagerly would need more memory still
                raise self.out_of_memory(error.inner_exception, snapshot) from None
            if not self.compiled or (self.trusted and not compile_error(error)):
                raise  # after a good compiled step only the compiler's own errors (a recompile) fall back
            snapshot.rewind(self.opt)
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            self.on_compile_failed(f"{type(error).__name__}: {first_line}")
            self.step_model, self.trusted, self.compiled = uncompiled(self.model), True, False
            return self(batches, accum, should_stop)
        self.trusted = True
        if loss is None:  # stopped between micro-batches: abandon the step, redo it on resume
            snapshot.rewind(self.opt)
            return StepOutcome(None)
        outcome = self.update(loss, snapshot)
        outcome.tokens = self.tokens
        outcome.compile_s = time.perf_counter() - started if compiling else None
        return outcome

    def forward_backward(self, batches: BatchSource, accum: int, should_stop: Callable[[], bool]) -> float | None:
        """This rank's micro-batches; the mean loss, or None when a stop request came in between
        (on one card: with several, ranks stop together at step boundaries)."""
        # summed on the device and read once per step: reading each micro-batch's loss would make the
        # CPU wait for the GPU every micro-batch instead of queueing the next one's work
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = 0  # input tokens of the step, every rank's
        for micro in range(accum):
            if micro and self.world.size == 1 and should_stop():
                return None
            # the ranks take turns through one stream, so every rank's loader stays at the same place
            drawn = [batches.next_batch() for _ in range(self.world.size)]
            inputs, targets = (t.to(self.device) for t in drawn[self.world.rank])
            self.tokens += sum(x.numel() for x, _ in drawn)  # every rank's: padded widths may differ
            with autocast_for(self.device):
                loss = self.step_model(inputs, targets)
            (loss / accum).backward()
            self.opt.accumulate()
            loss_sum += loss.detach()
        return loss_sum.item() / accum

    def out_of_memory(self, error: torch.OutOfMemoryError, snapshot: Snapshot | None) -> OutOfMemory:
        """Rewound to the step's start (`snapshot`), or, with the update cut short (None), its gradients
        dropped; the cache given back either way."""
        if snapshot is None:
            self.opt.zero_grad()
        else:
            snapshot.rewind(self.opt)
        torch.cuda.empty_cache()
        return OutOfMemory(error, intact=snapshot is not None)

    def update(self, loss: float, snapshot: Snapshot) -> StepOutcome:
        """Average across ranks, clip, and apply the update unless something is not finite. With
        several ranks, each updates the parameters it owns and sends them to the others."""
        try:
            if self.world.size > 1:
                self.opt.reduce_gradients()
                loss = distributed.mean(loss, self.world, self.device)
            grad_norm = float(self.opt.clip_grad_norm(self.grad_clip))
        except torch.OutOfMemoryError as error:  # nothing is updated yet: rewound, redone on resume
            raise self.out_of_memory(error, snapshot) from None
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            try:
                self.opt.step()
            except torch.OutOfMemoryError as error:  # some parameters updated, others not: not to be saved
                raise self.out_of_memory(error, None) from None
            self.opt.broadcast_weights()
        self.opt.zero_grad()
        return StepOutcome(loss, grad_norm, skipped)
