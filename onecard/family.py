"""Which model family a config names, and the model, optimizer and schedule it trains with: the
classic (nanochat's October 2025 GPT: model.py, optim.py, schedule.py) or nanochat-2026
(model_2026.py, optim_2026.py, schedule_2026.py).
The runtime builds through here; each family's module builds only its own."""

from __future__ import annotations

import torch

from onecard.distributed import SINGLE, World
from onecard.model import GPT
from onecard.model import build_model as build_classic
from onecard.model_config import GPTConfig
from onecard.optim import Optimizers
from onecard.optim import build_optimizer as build_classic_optimizer
from onecard.recipe import Recipe


def build_model(config: GPTConfig, device: str | torch.device = "cpu", init: bool = True) -> GPT:
    """The model of the config's family on `device`, with its family's init (meta: shapes only)."""
    if config.arch == "classic":
        return build_classic(config, device, init)
    from onecard.model_2026 import build_model_2026
    return build_model_2026(config, device, init)


def build_optimizer(model: GPT, recipe: Recipe | None = None, matrix_lr: float = 0.02, embedding_lr: float = 0.2,
                    unembedding_lr: float = 0.004, total_batch: int | None = None,
                    fine_tune: float | None = None, world: World = SINGLE) -> Optimizers:
    """The family's optimizer setup laid out as the recipe says, for rank world.rank of world.size.
    The classic takes the learning rates given; nanochat-2026 sets its own: scaled with total_batch
    (tokens) for pre-training, or the share `fine_tune` of them for fine-tuning (optim_2026.py)."""
    if model.config.arch == "classic":
        return build_classic_optimizer(model, recipe, matrix_lr=matrix_lr, embedding_lr=embedding_lr,
                                       unembedding_lr=unembedding_lr, world=world)
    from onecard.optim_2026 import build_optimizer_2026, fine_tuning_optimizer_2026
    if fine_tune is not None:
        return fine_tuning_optimizer_2026(model, recipe, fine_tune, world)
    return build_optimizer_2026(model, recipe, total_batch or 2 ** 19, world=world)


def grad_clip(config: GPTConfig) -> float:
    """The gradient norm's ceiling a new run of this family trains with (0: none). nanochat-2026's
    base_train.py and chat_sft.py (karpathy/nanochat 00255c1) do not clip; the classic's nanochat does, at 1."""
    return 1.0 if config.arch == "classic" else 0.0


def apply_sft_schedule(config: GPTConfig, opt: Optimizers, step: int, total_steps: int) -> float:
    """Fine-tuning's schedule for `step` of `total_steps`; returns the lr factor. The classic: a linear
    decay to zero at Muon momentum 0.95, as nanochat's chat_sft.py at fae3aca; nanochat-2026: its own."""
    if config.arch == "classic":
        multiplier = 1.0 - step / total_steps
        opt.set_lr_multiplier(multiplier)
        opt.set_muon_momentum(0.95)
        return multiplier
    from onecard import schedule_2026
    return schedule_2026.apply_sft(opt, step, total_steps)


def apply_schedule(config: GPTConfig, opt: Optimizers, step: int, total_steps: int) -> float:
    """Set the family's learning rates (and momentum) for `step` of `total_steps`; returns the lr factor."""
    if config.arch == "classic":
        from onecard import schedule
        return schedule.apply(opt, step, total_steps)
    from onecard import schedule_2026
    return schedule_2026.apply(opt, step, total_steps)
