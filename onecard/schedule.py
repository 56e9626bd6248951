"""The schedules of base training, as nanochat's: the learning-rate factor over the run and
Muon's momentum warm-up (docs/architecture.md#schedule). SFT brings its own."""

from __future__ import annotations


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


def apply(opt, step: int, total_steps: int) -> float:
    """Set the step's learning rates and Muon momentum; returns the lr factor."""
    multiplier = lr_multiplier(step, total_steps)
    opt.set_lr_multiplier(multiplier)
    opt.set_muon_momentum(muon_momentum(step))
    return multiplier
