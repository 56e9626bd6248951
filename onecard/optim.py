"""Optimizers of the nanochat recipe: Muon for the block matrices, AdamW for wte and lm_head.

Muon here follows nanochat's rule exactly (momentum as an exponential average, Nesterov by a
second lerp, Newton-Schulz orthogonalization in bf16, step scaled by sqrt(max(1, rows/cols))),
which differs slightly from torch.optim.Muon's momentum rule, so it is written out. AdamW is
torch.optim.AdamW's math (bias correction, decoupled weight decay), written out so that its
moments can be stored in bf16 or 8 bits.

Each parameter's weight, master copy and gradient buffer live where its Slot says (onecard/slots.py,
from the recipe); its states are StateTensors (fp32 | bf16 | 8-bit, lowbit.py) on the device or on
the CPU (optim_place), and the elementwise update runs where the states are.

Every update is computed in fp32. With optim_place=cpu, Muon's Newton-Schulz iterations still
run on the model's device: they are matrix products a GPU does in milliseconds and a CPU in
minutes at d32 (one matrix at a time goes down and up in bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from onecard import distributed
from onecard.distributed import SINGLE, World
from onecard.fp8 import convert_to_fp8
from onecard.lowbit import StateTensor
from onecard.model import GPT
from onecard.recipe import Recipe
from onecard.slots import Slot, folder_for, hook_grad, make_slots, nbytes

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (docs/architecture.md#muon)
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
UPDATE_CHUNK = 1 << 22  # AdamW updates this many elements at a time: bounded fp32 temporaries


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U·V^T of a matrix g = U·S·V^T by quintic Newton-Schulz iterations, in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):  # the scaled sums fused into the products: fewer passes, fewer kernels
        gram = x @ x.mT
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.mT if tall else x


class DecodedStates(Mapping):
    """param -> {name: fp32 tensor}, decoded when asked for, one parameter at a time."""

    def __init__(self, stored: dict) -> None:
        self.stored = stored

    def __getitem__(self, p: torch.nn.Parameter) -> dict:
        return {k: v.read().view(v.shape) if isinstance(v, StateTensor) else v for k, v in self.stored[p].items()}

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


def _param_groups(params, defaults: dict) -> list[dict]:
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    return [{**defaults, **group, "params": list(group["params"])} for group in groups]


class StatefulOptimizer:
    """What Muon and AdamW share: groups, slots, states in a recipe's format, state dicts."""

    def __init__(self, params, defaults: dict, slots: dict | None) -> None:
        self.defaults = defaults
        self.param_groups = _param_groups(params, defaults)
        slots = slots or {}
        self.slots: dict[torch.nn.Parameter, Slot] = {
            p: slots.get(p) or Slot(p, p.device) for p in self.params()}
        self.stored: dict[torch.nn.Parameter, dict] = {}  # per parameter: StateTensors and counters

    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def momentum(self, p: torch.nn.Parameter, beta: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's gradient of `p` in fp32 where its states live, and its momentum buffer with
        the gradient averaged in (stored back); None when `p` has no gradient this step or is
        another rank's to update."""
        slot = self.slots[p]
        grad = slot.grad()
        if grad is None or not slot.owned:
            return None
        g = grad.to(slot.place).float()
        state = self.stored[p]["momentum_buffer"]
        buf = state.read().view(g.shape)
        buf.lerp_(g, 1 - beta)
        state.write(buf)
        return g, buf

    @property
    def state(self) -> DecodedStates:
        """Each parameter's states decoded to fp32 in its shape (for fp32, views of the storage)."""
        return DecodedStates(self.stored)

    def state_tensors(self) -> list[StateTensor]:
        return [v for s in self.stored.values() for v in s.values() if isinstance(v, StateTensor)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.slots.values():
            slot.zero_grad()

    def owned(self) -> list[torch.nn.Parameter]:
        """The parameters this rank updates and holds states for (all of them on one card)."""
        return [p for p in self.params() if self.slots[p].owned]

    def saved_state(self, p: torch.nn.Parameter) -> dict | None:
        """What a checkpoint keeps of an owned parameter's states (None for another rank's)."""
        if not self.slots[p].owned:
            return None
        saved = {k: v.state_dict() if isinstance(v, StateTensor) else v for k, v in self.stored[p].items()}
        if self.slots[p].master is not None:
            saved["master"] = self.slots[p].master
        if self.slots[p].generator is not None:
            saved["rounding_rng"] = self.slots[p].generator.get_state()
        return saved

    def state_dict(self, collect: Callable[[dict | None, int], dict | None] | None = None) -> dict:
        """Only tensors, numbers and strings: loads with torch.load(weights_only=True). With several
        ranks, `collect(saved, owner)` brings each parameter's state from its owner to rank 0."""
        state = [self.saved_state(p) if collect is None else collect(self.saved_state(p), self.slots[p].owner)
                 for p in self.params()]
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, saved: dict) -> None:
        params = self.params()
        if len(saved["param_groups"]) != len(self.param_groups) or len(saved["state"]) != len(params):
            raise ValueError(f"optimizer state has {len(saved['state'])} parameters in "
                             f"{len(saved['param_groups'])} groups, this optimizer {len(params)} in "
                             f"{len(self.param_groups)}")
        for group, saved_group in zip(self.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for p, saved_state in zip(params, saved["state"], strict=True):
            if not self.slots[p].owned:  # another rank's: it sends the updated weight each step
                continue
            stored = self.stored[p]
            for key, value in saved_state.items():
                if key == "master":
                    self.slots[p].load_master(value)
                elif key == "rounding_rng":  # another recipe's stochastic rounding: nothing to restore
                    if self.slots[p].generator is not None:
                        self.slots[p].generator.set_state(value.clone())
                elif isinstance(stored.get(key), StateTensor):
                    stored[key].load_state_dict(value)
                elif isinstance(stored.get(key), torch.Tensor):  # into place: a checkpoint is read onto the CPU
                    if stored[key].shape != value.shape:
                        raise ValueError(f"optimizer state {key} has shape {tuple(value.shape)}, this optimizer "
                                         f"{tuple(stored[key].shape)}")
                    stored[key].copy_(value)
                else:
                    stored[key] = value


class Muon(StatefulOptimizer):
    """Momentum, then orthogonalize the update of each 2-D matrix (nanochat's form)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, states: str = "fp32", slots: dict | None = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps), slots)
        for p in self.params():
            if p.ndim != 2:
                raise ValueError(f"Muon updates matrices; got a parameter of shape {tuple(p.shape)}")
        for p in self.owned():
            self.stored[p] = {"momentum_buffer": StateTensor(p.shape, states, self.slots[p].place)}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if (found := self.momentum(p, momentum)) is None:
                    continue
                g, buf = found
                slot = self.slots[p]
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                # Newton-Schulz runs where the model is (bf16 either way: convert before moving)
                update = orthogonalize(update.bfloat16().to(p.device), group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                slot.apply(0, p.numel(), update.reshape(-1), 1.0, group["lr"] * scale)


class AdamW(StatefulOptimizer):
    """torch.optim.AdamW's update with the moments stored as fp32, bf16 or 8-bit blocks.

    The update of a step uses the moments before they are rounded to their storage format;
    rounding shows from the next step on. 8-bit: signed log code for m, log code for v
    (lowbit.py); Muon's momentum uses the linear code.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, states: str = "fp32", slots: dict | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), slots)
        for p in self.owned():
            place = self.slots[p].place
            self.stored[p] = {"step": 0,
                              "exp_avg": StateTensor(p.shape, states, place, code="signed_log"),
                              "exp_avg_sq": StateTensor(p.shape, states, place, code="log")}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                slot = self.slots[p]
                grad = slot.grad()
                if grad is None or not slot.owned:
                    continue
                stored = self.stored[p]
                stored["step"] += 1
                t = stored["step"]
                bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
                step_size = group["lr"] / (1 - beta1 ** t)
                decay = 1 - group["lr"] * group["weight_decay"]
                m_state, v_state = stored["exp_avg"], stored["exp_avg_sq"]
                flat = grad.reshape(-1)
                for lo in range(0, flat.numel(), UPDATE_CHUNK):
                    hi = min(lo + UPDATE_CHUNK, flat.numel())
                    g = flat[lo:hi].to(slot.place).float()
                    m = m_state.read(lo, hi).lerp_(g, 1 - beta1)
                    v = v_state.read(lo, hi).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    m_state.write(m, lo)
                    v_state.write(v, lo)
                    denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                    slot.apply(lo, hi, m / denom, decay, step_size)


class Optimizers:
    """The run's optimizers stepped together, with the schedule knobs the trainer turns."""

    def __init__(self, optimizers: list[StatefulOptimizer], recipe: Recipe | None = None,
                 world: World = SINGLE) -> None:
        self.optimizers = optimizers
        self.recipe = recipe or Recipe()
        self.world = world
        self.slots = [opt.slots[p] for opt in optimizers for p in opt.params()]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        if self.recipe.grads == "cpu":  # every slot's buffer is in CPU memory
            folder_for(self.slots)
        for slot in self.slots:
            hook_grad(slot)

    @property
    def muon(self) -> Muon:
        return next(o for o in self.optimizers if isinstance(o, Muon))

    def params(self) -> list[torch.nn.Parameter]:
        return [slot.param for slot in self.slots]

    def accumulate(self) -> None:
        """Called after each micro-batch's backward. Gradients in the weights' dtype accumulate in
        .grad by autograd; buffered ones were already folded (or queued) by their hooks: this folds
        any that reached .grad some other way. Queued folds go on under the next micro-batch: every
        reader of a buffer (Slot.grad, zero_grad) waits for them first."""
        for slot in self.slots:
            slot.fold_grad()

    def gradients(self) -> list[torch.Tensor]:
        """The step's accumulated gradients of the parameters this rank updates, wherever the recipe
        keeps them (after reduce_gradients, with several ranks: averaged over them)."""
        return [g for slot in self.slots if slot.owned and (g := slot.grad()) is not None]

    def reduce_gradients(self) -> None:
        """With several ranks: each parameter's gradient averaged onto the rank that updates it."""
        if self.world.size > 1:
            distributed.average_onto([(g, slot.owner) for slot in self.slots if (g := slot.grad()) is not None],
                                     self.world)

    def broadcast_weights(self) -> None:
        """With several ranks: each updated weight from its owner to the others."""
        if self.world.size > 1:
            distributed.broadcast_from([(slot.param.detach(), slot.owner) for slot in self.slots], self.world)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the accumulated gradients to max_norm (as torch's clip_grad_norm_; 0: no clipping, as
        nanochat-2026 trains); returns the norm before clipping, on the CPU. With several ranks, the
        norm of the whole averaged gradient, each rank holding its owned part."""
        grads = self.gradients()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        norms = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                       for g in gs])).cpu() for gs in by_device.values()]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if self.world.size > 1:
            total = distributed.sum_on_host(total.square(), self.world).sqrt()
        if max_norm <= 0:
            return total
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for device, gs in by_device.items():
            device_coef = coef.to(device)
            for g in gs:
                g.mul_(device_coef)
        return total

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        """Empty the buffers for the next step (or a rewound one), after any fold still queued."""
        for slot in self.slots:
            slot.zero_grad()

    def set_lr_multiplier(self, multiplier: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier

    def set_muon_momentum(self, momentum: float) -> None:
        for group in self.muon.param_groups:
            group["momentum"] = momentum

    def state_dict(self) -> list[dict] | None:
        """Every optimizer's state; with several ranks, gathered onto rank 0 (every rank takes part)
        and None on the others. The same file either way: a run may resume on another number of cards."""
        if self.world.size == 1:
            return [opt.state_dict() for opt in self.optimizers]
        state = [opt.state_dict(lambda saved, owner: distributed.onto_rank0(saved, owner, self.world))
                 for opt in self.optimizers]
        return state if self.world.main else None

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)

    def state_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes held right now by weights, gradients and optimizer states, measured from the tensors.

        'device' is the model's device and 'cpu' what the recipe moved to CPU memory (on a CPU-only
        machine both are host memory; the split is the recipe's). weights: parameters, and fp32
        master copies on the CPU. grads: accumulation buffers (allocated for the whole run) plus
        any .grad autograd holds now. optimizer: states with their 8-bit scales. Buffers such as
        the rotary tables are not parameters and are not counted.
        """
        out = {kind: {"device": 0, "cpu": 0} for kind in ("weights", "grads", "optimizer")}
        grads_place = "cpu" if self.recipe.grads == "cpu" else "device"
        for slot in self.slots:
            out["weights"]["device"] += nbytes(slot.param)
            out["weights"]["cpu"] += nbytes(slot.master)
            out["grads"]["device"] += nbytes(slot.param.grad)
            out["grads"][grads_place] += nbytes(slot.grad_buf)
        states_place = "cpu" if self.recipe.optim_place == "cpu" else "device"
        states = [s for opt in self.optimizers for s in opt.state_tensors()]
        plain = sum(nbytes(v) for opt in self.optimizers for stored in opt.stored.values()
                    for v in stored.values() if isinstance(v, torch.Tensor))  # e.g. NorMuon's second moment
        out["optimizer"][states_place] = sum(s.nbytes() for s in states) + plain
        return out


def build_optimizer(model: GPT, recipe: Recipe | None = None, matrix_lr: float = 0.02,
                    embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                    weight_decay: float = 0.0, world: World = SINGLE) -> Optimizers:
    """nanochat's optimizer setup, laid out as the recipe says; AdamW rates scale with
    (n_embd/768)^-0.5, Muon's does not. (nanochat-2026 models: onecard.family.build_optimizer.)

    Casts the model's weights to the recipe's dtype and, for matmul=fp8, swaps the block linears
    for FP8 ones (or refuses with the reason). Load weights into the model before this: a
    cpu_master recipe copies them into its fp32 master here.
    """
    recipe = recipe or Recipe()
    if model.config.arch != "classic":
        raise ValueError(f"{model.config.arch} optimizers are built by onecard.family.build_optimizer")
    if recipe.matmul == "fp8":
        convert_to_fp8(model)
    slots = make_slots(model, recipe, world.rank, world.size)
    groups = model.parameter_groups()
    scale = (model.config.n_embd / 768) ** -0.5
    adam = AdamW(
        [dict(params=groups["lm_head"], lr=unembedding_lr * scale),
         dict(params=groups["embedding"], lr=embedding_lr * scale)],
        betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, states=recipe.optim_states, slots=slots,
    )
    muon = Muon(groups["matrix"], lr=matrix_lr, momentum=0.95, states=recipe.optim_states, slots=slots)
    return Optimizers([adam, muon], recipe, world)
