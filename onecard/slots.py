"""Where a recipe keeps each parameter's pieces, and the hooks that fill its gradient buffer.

Each parameter has a Slot (recipe.py has the layouts):

  weight     fp32, or bf16 written back with stochastic rounding (params=bf16_sr), or bf16 on
             the device with an fp32 master copy on the CPU (params=cpu_master)
  gradient   .grad as autograd leaves it, or an accumulation buffer when the recipe's gradient
             dtype or place differs from the weight's (bf16 weights with grads=fp32; grads=cpu).
             A buffer is filled by a hook as soon as autograd has each parameter's gradient, and
             the device's .grad is freed at once, so a full set of device gradients never exists.
             With grads=cpu the hook only queues the fold (grad_fold.py) and a worker thread does
             it while backward goes on; whatever reads a buffer first waits for the queue.
  states     the optimizers' (onecard/optim.py), on the device or on the CPU (optim_place).
  owner      the rank that updates it (recipe.shard_owners): only the owner holds its states and
             master copy; the others receive the updated weight.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from onecard.grad_fold import STAGING_BYTES, GradFolder, fold_into
from onecard.lowbit import stochastic_round_bf16
from onecard.model import GPT
from onecard.recipe import Recipe, shard_owners, state_elements

GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(eq=False)
class Slot:
    """One parameter and where the recipe keeps its weight, master copy, gradient and states."""

    param: torch.nn.Parameter
    place: torch.device                     # where its optimizer states live and its update runs
    master: torch.Tensor | None = None      # fp32 copy on the CPU (params=cpu_master)
    grad_buf: torch.Tensor | None = None    # accumulation buffer when it differs from .grad
    stochastic: bool = False                # bf16 weight written back with stochastic rounding
    grad_empty: bool = True                 # grad_buf holds nothing yet this step
    folder: GradFolder | None = None        # folds into grad_buf on a worker thread (grads=cpu)
    owner: int = 0                          # the rank that updates it
    owned: bool = True                      # this rank is its owner: it holds the states and master
    # the stochastic rounding's own random stream (bf16_sr, owner only): it draws for this parameter
    # alone, so the global RNG stays the same on every rank, whichever parameters a rank owns
    generator: torch.Generator | None = None

    def grad(self) -> torch.Tensor | None:
        """The gradient accumulated so far this step (None when there is none)."""
        if self.grad_buf is None:
            return self.param.grad
        self.drain()
        return None if self.grad_empty else self.grad_buf

    @torch.no_grad()
    def fold_grad(self) -> None:
        """Move .grad into the accumulation buffer (if this slot has one) and free it; with a
        folder, the move is queued (the buffer is complete after drain())."""
        g = self.param.grad
        if self.grad_buf is None or g is None:
            return
        if self.folder is not None:  # copy or add is decided here, in hook order, not by the worker
            self.folder.submit(self.grad_buf, g, first=self.grad_empty)
        else:
            fold_into(self.grad_buf, g, first=self.grad_empty)
        self.grad_empty = False
        self.param.grad = None

    def drain(self) -> None:
        """Wait for the folds queued into grad_buf (and re-raise a failed one)."""
        if self.folder is not None:
            self.folder.drain()

    def zero_grad(self) -> None:
        try:
            self.drain()  # a late fold must not land in the next step's buffer
        finally:
            self.param.grad = None
            self.grad_empty = True

    @torch.no_grad()
    def apply(self, lo: int, hi: int, update: torch.Tensor, decay: float, alpha: float) -> None:
        """weight[lo:hi] <- weight·decay − alpha·update (flat elements), in fp32, then stored."""
        flat = self.param.detach().view(-1)
        if self.master is not None:  # the fp32 master is the weight; the device gets a bf16 copy
            w = self.master.view(-1)[lo:hi]
            if decay != 1.0:
                w.mul_(decay)
            w.add_(update.to(w.device), alpha=-alpha)
            flat[lo:hi].copy_(w.to(flat.dtype))  # round on the CPU: half the bytes cross the bus
            return
        if flat.dtype == torch.float32:
            w = flat[lo:hi]
            if decay != 1.0:
                w.mul_(decay)
            w.add_(update.to(w.device), alpha=-alpha)
            return
        w = flat[lo:hi].float()
        if decay != 1.0:
            w.mul_(decay)
        w.add_(update.to(w.device), alpha=-alpha)
        flat[lo:hi].copy_(stochastic_round_bf16(w, self.generator) if self.stochastic else w)

    @torch.no_grad()
    def load_master(self, master: torch.Tensor) -> None:
        """Restore the fp32 weight from a checkpoint (and the device copy from it)."""
        if self.master is not None:
            self.master.copy_(master)
        self.param.detach().copy_(master)


def hook_grad(slot: Slot) -> None:
    """Fold (grads=cpu: queue the fold of) each gradient into the slot's buffer as soon as autograd
    has it (or stop doing so)."""
    param = slot.param
    old = getattr(param, "_onecard_grad_hook", None)
    if old is not None:  # a previous build_optimizer on this model: its buffers are no longer used
        old.remove()
        param._onecard_grad_hook = None
    if slot.grad_buf is not None:
        # a weak reference: the hook lives inside the tensor, where the garbage collector cannot see
        # it, so a strong one would keep the slot, and through it the parameter, alive forever
        slot_ref = weakref.ref(slot)

        def fold(_param: torch.Tensor) -> None:
            live = slot_ref()
            if live is not None:
                live.fold_grad()

        param._onecard_grad_hook = param.register_post_accumulate_grad_hook(fold)


def folder_for(slots: list[Slot]) -> GradFolder:
    """One folder for the slots' CPU buffers (grads=cpu); staging no larger than the largest."""
    largest = max((nbytes(slot.grad_buf) for slot in slots), default=0)
    folder = GradFolder(staging_bytes=max(8, min(STAGING_BYTES, largest)))
    for slot in slots:
        slot.folder = folder
    return folder


def owners(model: GPT, ranks: int) -> list[int]:
    """Each parameter's owner among `ranks`, in model.parameters() order, by its optimizer-state
    elements (recipe.state_elements, as plan/persistent.py counts them)."""
    matrices = {id(p) for p in model.parameter_groups()["matrix"]}
    return shard_owners([state_elements(p.numel(), id(p) in matrices) for p in model.parameters()], ranks)


def make_slots(model: GPT, recipe: Recipe, rank: int = 0, ranks: int = 1) -> dict[torch.nn.Parameter, Slot]:
    """Lay the model's parameters out as the recipe says, casting the weights in place; this is
    rank `rank` of `ranks`."""
    device = model.lm_head.weight.device
    place = torch.device("cpu") if recipe.optim_place == "cpu" else device
    pin = device.type == "cuda"  # pinned host memory: faster, asynchronous copies to and from the GPU
    slots = {}
    seed = torch.initial_seed()  # the run's seed (session.prepare), the same on every rank
    for index, (p, owner) in enumerate(zip(model.parameters(), owners(model, ranks), strict=True)):
        master, generator = None, None
        if recipe.params == "cpu_master" and owner == rank:  # taken before the cast: all of fp32
            master = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
            master.copy_(p.detach())
        if recipe.params == "bf16_sr" and owner == rank:
            generator = torch.Generator(device=p.device).manual_seed((seed + index) % 2 ** 63)
        slots[p] = Slot(p, place, master=master, stochastic=recipe.params == "bf16_sr", owner=owner,
                        owned=owner == rank, generator=generator)
    # nanochat keeps wte (nanochat-2026: and the value embeddings) in bf16 on CUDA (recipe.py)
    bf16_on_cuda = {id(p) for p in getattr(model, "bf16_on_cuda", lambda: [model.transformer.wte.weight])()}
    for p in model.parameters():
        # bf16 weights for bf16_sr and cpu_master
        if recipe.params != "fp32" or (device.type == "cuda" and id(p) in bf16_on_cuda):
            p.data = p.data.to(torch.bfloat16)
    for p, slot in slots.items():
        if recipe.grads == "cpu":
            slot.grad_buf = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
        elif GRAD_DTYPES[recipe.grads] != p.dtype:
            slot.grad_buf = torch.empty(p.shape, dtype=GRAD_DTYPES[recipe.grads], device=p.device)
    return slots
