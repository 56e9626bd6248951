"""nanochat-2026's optimizer (nanochat 92d63d4 nanochat/optim.py MuonAdamW, set up as its gpt.py
setup_optimizer does) inside onecard's recipe machinery (optim.py: slots, state formats, offload).

Muon's variant there, per matrix: Nesterov momentum; MuonEq row equilibration (arXiv 2603.28254);
Polar Express orthogonalization (arXiv 2505.16932, its 5 coefficient triples); Muon+ Frobenius
renormalization to sqrt(min(m, n)) (arXiv 2602.21545); NorMuon's factored second moment
(arXiv 2510.05491) per row (rows >= cols) or per column; cautious weight decay (only where update
and weight agree in sign). nanochat stacks same-shaped matrices and runs one fused kernel; every
operation is per matrix, so here each matrix is updated alone: the same arithmetic.

The orthogonalization runs in bf16 on CUDA and in fp32 on the CPU, as nanochat's COMPUTE_DTYPE.
The momentum is kept in the recipe's state format; the factored second moment (one number per
row or column) in fp32.
"""

from __future__ import annotations

import torch

from onecard.distributed import SINGLE, World
from onecard.model_2026 import GPT2026, compute_dtype
from onecard.optim import AdamW, Muon, Optimizers
from onecard.recipe import Recipe
from onecard.schedule_2026 import (
    EMBEDDING_LR,
    MATRIX_LR,
    SCALAR_LR,
    UNEMBEDDING_LR,
    batch_lr_scale,
    scaled_weight_decay,
)
from onecard.slots import make_slots

# Polar Express coefficients for 5 iterations (arXiv 2505.16932; nanochat 92d63d4 optim.py)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORMUON_BETA2 = 0.9  # nanochat 92d63d4 gpt.py setup_optimizer, Muon groups
SMEAR_LR = 0.2  # nanochat 92d63d4 gpt.py setup_optimizer: smear/backout group, not batch-scaled
ADAMW_EPS = 1e-10


def polar_express(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Row-equilibrated, then orthogonalized by Polar Express iterations, in `dtype`."""
    x = g.to(dtype)
    target = x.float().norm() / x.size(-2) ** 0.5
    rows = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    x = x * (target / rows).to(dtype)
    x = x / (x.norm() * 1.01 + 1e-6)
    tall = g.size(-2) > g.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        gram = x.mT @ x if tall else x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + (x @ poly if tall else poly @ x)
    return x


class NorMuon(Muon):
    """Muon as nanochat 92d63d4 runs it (see the module docstring); groups add beta2 and weight_decay."""

    def __init__(self, params, lr: float = MATRIX_LR, momentum: float = 0.95, ns_steps: int = 5,
                 beta2: float = NORMUON_BETA2, weight_decay: float = 0.0, states: str = "fp32",
                 slots: dict | None = None) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=True, ns_steps=ns_steps, states=states,
                         slots=slots)
        for group in self.param_groups:
            group.setdefault("beta2", beta2)
            group.setdefault("weight_decay", weight_decay)
        for p in self.owned():
            rows, cols = p.shape
            shape = (rows, 1) if rows >= cols else (1, cols)
            self.stored[p]["second_momentum_buffer"] = torch.zeros(shape, device=self.slots[p].place)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            m, beta2, wd = group["momentum"], group["beta2"], group["weight_decay"]
            for p in group["params"]:
                if (found := self.momentum(p, m)) is None:
                    continue
                g, buf = found
                slot, stored = self.slots[p], self.stored[p]
                g = g.lerp(buf, m)
                x = polar_express(g.to(p.device), group["ns_steps"], compute_dtype(p.device))
                u = x.float().to(slot.place)
                u = u * (min(u.shape) ** 0.5 / u.norm().clamp_min(1e-6))  # Muon+
                rows, cols = u.shape
                red = -1 if rows >= cols else -2
                v_mean = u.square().mean(dim=red, keepdim=True)
                size = u.size(red)
                v_norm = (v_mean.sum() * size).sqrt()
                second = stored["second_momentum_buffer"]
                second.lerp_(v_mean, 1 - beta2)
                step_size = second.clamp_min(1e-10).rsqrt()
                v_norm_new = ((v_mean * size) * step_size.square()).sum().sqrt()
                u = u * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
                lr = group["lr"] * max(1.0, rows / cols) ** 0.5
                weight = (slot.master if slot.master is not None else p.detach()).float().to(slot.place)
                cautious = (u * weight) >= 0
                slot.apply(0, p.numel(), (lr * u + lr * wd * weight * cautious).reshape(-1), 1.0, 1.0)


def fine_tuning_optimizer_2026(model: GPT2026, recipe: Recipe | None, fraction: float,
                               world: World = SINGLE) -> Optimizers:
    """Fine-tuning's optimizer, as nanochat's chat_sft.py (karpathy/nanochat 00255c1) sets it up: the
    pre-training rates unscaled by any batch, every group's times `fraction`, no weight decay (the
    pre-training schedule has brought it to zero)."""
    return build_optimizer_2026(model, recipe, embedding_lr=EMBEDDING_LR * fraction,
                                unembedding_lr=UNEMBEDDING_LR * fraction, matrix_lr=MATRIX_LR * fraction,
                                scalar_lr=SCALAR_LR * fraction, smear_lr=SMEAR_LR * fraction, weight_decay=0.0,
                                world=world)


def build_optimizer_2026(model: GPT2026, recipe: Recipe | None = None, total_batch: int = 2 ** 19,
                         embedding_lr: float = EMBEDDING_LR, unembedding_lr: float = UNEMBEDDING_LR,
                         matrix_lr: float = MATRIX_LR, scalar_lr: float = SCALAR_LR, smear_lr: float = SMEAR_LR,
                         weight_decay: float | None = None, world: World = SINGLE) -> Optimizers:
    """nanochat's groups and rates; learning rates scaled by sqrt(total_batch / 2^19) and Muon's
    weight decay by the batch and depth (schedule_2026.py), unless weight_decay is given."""
    from onecard.fp8 import convert_to_fp8

    recipe = recipe or Recipe()
    if recipe.matmul == "fp8":
        convert_to_fp8(model)
    slots = make_slots(model, recipe, world.rank, world.size)
    groups = model.parameter_groups()
    batch = batch_lr_scale(total_batch)
    if weight_decay is None:
        weight_decay = scaled_weight_decay(model.config, total_batch)
    d = (model.config.n_embd / 768) ** -0.5  # AdamW rates ∝ 1/sqrt(width), tuned at 768
    emb, unemb, scalar = embedding_lr * batch, unembedding_lr * batch, scalar_lr * batch
    adam = AdamW([
        dict(params=groups["lm_head"], lr=unemb * d, betas=(0.8, 0.96), weight_decay=0.01),
        dict(params=groups["embedding"], lr=emb * d, betas=(0.8, 0.995), weight_decay=0.001),
        dict(params=groups["value_embeds"], lr=emb * d * 0.5, betas=(0.8, 0.995), weight_decay=0.01),
        dict(params=groups["resid"], lr=scalar * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        dict(params=groups["x0"], lr=scalar, betas=(0.96, 0.95), weight_decay=0.0),
        dict(params=groups["smear"], lr=smear_lr, betas=(0.8, 0.95), weight_decay=0.0),
    ], eps=ADAMW_EPS, states=recipe.optim_states, slots=slots)
    matrices = groups["matrix"]
    muon = NorMuon([dict(params=[p for p in matrices if p.shape == shape])
                    for shape in sorted({p.shape for p in matrices})],
                   lr=matrix_lr * batch, weight_decay=weight_decay, states=recipe.optim_states, slots=slots)
    for group in muon.param_groups:
        group["initial_weight_decay"] = group["weight_decay"]
    return Optimizers([adam, muon], recipe, world)
