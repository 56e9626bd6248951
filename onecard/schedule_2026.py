"""nanochat-2026's training hyperparameters and schedules, as functions of the model and batch.

Source: karpathy/nanochat scripts/base_train.py at commit 00255c1 (the nearest copy of the script
that could be read: the 92d63d4 reference folder holds nanochat/*.py only, not scripts/), whose
optimizer call is nanochat 92d63d4 gpt.py setup_optimizer. Plain arithmetic: the planner uses it.

- batch size: B = 2^round(log2(B_REF · (D/D_REF)^0.383)), D = ratio x (transformer matrices +
  lm_head), D_REF the same for d12 (Power Lines, arXiv 2505.13738); the ratio cancels out
- learning rates x sqrt(B/B_REF); Muon's weight decay x sqrt(B/B_REF) · D_REF/D (arXiv 2405.13698)
- learning rate: 40 warm-up steps, constant, linear warm-down over the last 65 % to 5 %
- Muon momentum 0.85 -> 0.97 over 400 steps, 0.97 -> 0.90 during the warm-down
- Muon weight decay: cosine from its scaled value to zero over the run
"""

from __future__ import annotations

import math

from onecard import schedule
from onecard.model_config import GPTConfig, scaling_params

B_REF = 2 ** 19  # tokens per step tuned at d12 (base_train.py B_REF)
BATCH_EXPONENT = 0.383  # Bopt ∝ D^0.383 (base_train.py)
REF_DEPTH = 12
# base_train.py argument defaults
EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR, SCALAR_LR = 0.3, 0.008, 0.02, 0.5
WEIGHT_DECAY = 0.28
RATIO = 12  # --target-param-data-ratio default: tokens per scaling parameter
WARMUP_STEPS, WARMDOWN_RATIO, FINAL_LR_FRAC = 40, 0.65, 0.05
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END, MOMENTUM_WARMUP = 0.85, 0.97, 0.90, 400


def reference_config(config: GPTConfig) -> GPTConfig:
    return GPTConfig.from_depth(REF_DEPTH, config.vocab_size, config.sequence_len, arch=config.arch)


def data_ratio_to_ref(config: GPTConfig) -> float:
    """D/D_REF at the same tokens:params ratio: the model's scaling parameters over d12's."""
    return scaling_params(config) / scaling_params(reference_config(config))


def auto_total_batch(config: GPTConfig) -> int:
    """nanochat's automatic batch size for this depth (tokens per optimizer step)."""
    predicted = B_REF * data_ratio_to_ref(config) ** BATCH_EXPONENT
    return 2 ** round(math.log2(predicted))


def batch_lr_scale(total_batch: int) -> float:
    return (total_batch / B_REF) ** 0.5


def scaled_weight_decay(config: GPTConfig, total_batch: int, weight_decay: float = WEIGHT_DECAY) -> float:
    return weight_decay * math.sqrt(total_batch / B_REF) / data_ratio_to_ref(config)


def lr_multiplier(step: int, total_steps: int) -> float:
    """The classic's shape (onecard/schedule.py) with this family's warm-up, warm-down and floor."""
    return schedule.lr_multiplier(step, total_steps, warmup_ratio=WARMUP_STEPS / total_steps,
                                  warmdown_ratio=WARMDOWN_RATIO, final_fraction=FINAL_LR_FRAC)


def muon_momentum(step: int, total_steps: int) -> float:
    warmdown = round(WARMDOWN_RATIO * total_steps)
    start = total_steps - warmdown
    if step < MOMENTUM_WARMUP:
        frac = step / MOMENTUM_WARMUP
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_PEAK
    if step >= start:
        progress = (step - start) / warmdown
        return MOMENTUM_PEAK * (1 - progress) + MOMENTUM_END * progress
    return MOMENTUM_PEAK


def weight_decay_multiplier(step: int, total_steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total_steps))


# Fine-tuning (scripts/chat_sft.py at 00255c1): the rate constant, then down to zero over the last half;
# Muon's momentum from 0.85 to 0.95 over the first 300 steps
SFT_WARMDOWN_RATIO, SFT_MOMENTUM_START, SFT_MOMENTUM_END, SFT_MOMENTUM_WARMUP = 0.5, 0.85, 0.95, 300


def apply_sft(opt, step: int, total_steps: int) -> float:
    """Set a fine-tuning step's learning rates and Muon momentum; returns the lr factor."""
    multiplier = min(1.0, (1 - step / total_steps) / SFT_WARMDOWN_RATIO)
    ramp = min(step / SFT_MOMENTUM_WARMUP, 1.0)
    opt.set_lr_multiplier(multiplier)
    opt.set_muon_momentum((1 - ramp) * SFT_MOMENTUM_START + ramp * SFT_MOMENTUM_END)
    return multiplier


def apply(opt, step: int, total_steps: int) -> float:
    """Set the step's learning rates, Muon momentum and weight decay; returns the lr factor."""
    multiplier = lr_multiplier(step, total_steps)
    opt.set_lr_multiplier(multiplier)
    opt.set_muon_momentum(muon_momentum(step, total_steps))
    decay = weight_decay_multiplier(step, total_steps)
    for group in opt.muon.param_groups:
        group["weight_decay"] = group["initial_weight_decay"] * decay
    return multiplier
