"""Optimizers of the nanochat recipe: Muon for the block matrices, AdamW for wte and lm_head.

Muon here follows nanochat's rule exactly (momentum as an exponential average, Nesterov by a
second lerp, Newton-Schulz orthogonalization in bf16, step scaled by sqrt(max(1, rows/cols))),
which differs slightly from torch.optim.Muon's momentum rule, so it is written out.
"""

from __future__ import annotations

import torch

from onecard.model import GPT
from onecard.recipe import Recipe

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (REFERENCE §1)
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U·V^T of g = U·S·V^T by quintic Newton-Schulz iterations, computed in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalize the update of each 2-D matrix (nanochat's form)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)


class Optimizers:
    """The run's optimizers stepped together, with the schedule knobs the trainer turns."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]

    @property
    def muon(self) -> Muon:
        return next(o for o in self.optimizers if isinstance(o, Muon))

    def params(self) -> list[torch.nn.Parameter]:
        return [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]

    def accumulate(self) -> None:
        """Called after each micro-batch's backward; the plain recipe accumulates in .grad itself."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the accumulated gradients to max_norm; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.params(), max_norm)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr_multiplier(self, multiplier: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier

    def set_muon_momentum(self, momentum: float) -> None:
        for group in self.muon.param_groups:
            group["momentum"] = momentum

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


def build_optimizer(model: GPT, recipe: Recipe | None = None, matrix_lr: float = 0.02,
                    embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                    weight_decay: float = 0.0) -> Optimizers:
    """nanochat's optimizer setup; AdamW rates scale with (n_embd/768)^-0.5, Muon's does not."""
    recipe = recipe or Recipe()
    groups = model.parameter_groups()
    scale = (model.config.n_embd / 768) ** -0.5
    adam = torch.optim.AdamW(
        [dict(params=groups["lm_head"], lr=unembedding_lr * scale),
         dict(params=groups["embedding"], lr=embedding_lr * scale)],
        betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay,
    )
    muon = Muon(groups["matrix"], lr=matrix_lr, momentum=0.95)
    return Optimizers([adam, muon])


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_fraction: float = 0.0) -> float:
    """nanochat's schedule: optional warmup, constant, then linear decay over the last 20 %."""
    warmup = round(warmup_ratio * total_steps)
    warmdown = round(warmdown_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / warmdown
    return progress + (1 - progress) * final_fraction


def muon_momentum(step: int, warmup_steps: int = 300) -> float:
    """Muon momentum warms from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95
