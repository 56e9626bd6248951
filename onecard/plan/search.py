"""Candidate recipes for a model on a card: which fit, how fast, and the best one; and the best
model for a time budget.

A candidate is a named recipe from onecard/recipe.py at the largest micro-batch that fits
(powers of two up to MAX_MICRO_BATCH, so that gradient accumulation divides the total batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from onecard import defaults
from onecard.errors import UsageError
from onecard.model_config import ARCH_2026, MAX_DEPTH, GPTConfig, param_counts, scaling_params
from onecard.plan.assumptions import DEFAULT, Assumptions
from onecard.plan.catalog import GPU
from onecard.plan.memory import Memory, predict_memory
from onecard.plan.timing import Timing, energy_kwh, predict_time
from onecard.recipe import NAMED, Recipe, named_recipe
from onecard.schedule_2026 import RATIO as RATIO_2026
from onecard.schedule_2026 import auto_total_batch

MAX_MICRO_BATCH = 32  # nanochat's default device batch; larger rarely runs faster


@dataclass(frozen=True)
class Settings:
    """Everything about the run except the model and the token budget."""
    gpu: GPU
    gpus: int = 1
    seq_len: int = defaults.SEQ_LEN
    total_batch: int = defaults.TOTAL_BATCH
    micro_batch: int | None = None  # None: the largest that fits
    vocab_size: int = defaults.VOCAB_SIZE
    utilization: float | None = None  # None: modelled (timing.default_utilization)
    utilization_source: str = ""
    speed_factor: float = 1.0  # measured / modelled speed on this card (`onecard bench`)
    power_watts: float | None = None  # None: the card's board power
    price: float = defaults.PRICE  # per kWh: an example tariff, not a published rate (docs/time.md#tariff)
    currency: str = "USD"
    assume: Assumptions = DEFAULT
    arch: str = "classic"  # the model family (model_config.ARCHS)
    compile: bool = True  # every recipe compiled, as the trainer runs on CUDA unless --no-compile
    family_batch: bool = False  # each model trains with its family's own batch (nanochat-2026's grows with depth)

    def config(self, depth: int) -> GPTConfig:
        return GPTConfig.from_depth(depth, vocab_size=self.vocab_size, sequence_len=self.seq_len, arch=self.arch)


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    fits: bool
    memory: Memory
    timing: Timing
    tokens: int
    time_s: float
    energy_kwh: float
    cost: float
    note: str = ""


def micro_batches(s: Settings) -> list[int]:
    """Micro-batch sizes to try, largest first; each must divide one GPU's share of the batch."""
    rows = s.total_batch // (s.seq_len * s.gpus)
    if s.micro_batch is not None:
        return [s.micro_batch]
    return [b for b in (2 ** k for k in range(5, -1, -1)) if b <= min(rows, MAX_MICRO_BATCH) and rows % b == 0]


def check_batch(s: Settings) -> None:
    step = s.seq_len * s.gpus * (s.micro_batch or 1)
    if s.total_batch % step:
        raise UsageError(f"--total-batch {s.total_batch} is not a multiple of sequence x GPUs x micro-batch "
                         f"= {step}: gradient accumulation needs a whole number of micro-batches")


def whole_steps(tokens: float, total_batch: int) -> int:
    """The tokens a run asked for `tokens` trains: whole optimizer steps, rounded as `onecard train`
    rounds them, one at least."""
    return max(1, round(tokens / total_batch)) * total_batch


def card_cannot_run(recipe: Recipe, gpu: GPU) -> str:
    """Why the card cannot run the recipe at all, whatever the memory ('' where it can)."""
    return f"no FP8 tensor cores on {gpu.sm}" if recipe.matmul == "fp8" and not gpu.peak_fp8 else ""


def evaluate(config: GPTConfig, recipe: Recipe, s: Settings, tokens: int | None = None,
             seconds: float | None = None) -> Candidate:
    """One recipe at the largest micro-batch that fits; tokens given, or as many as fit in `seconds`."""
    recipe = recipe.with_(compile=s.compile)
    note = card_cannot_run(recipe, s.gpu)
    chosen, memory = None, None
    for b in micro_batches(s):
        r = recipe.with_(micro_batch=b, seq_len=s.seq_len)
        m = predict_memory(config, r, s.assume, micro_steps=s.total_batch // (s.gpus * b * s.seq_len),
                           shards=s.gpus)
        chosen, memory = r, m
        if m.total <= s.gpu.vram_bytes:
            break
    fits = memory.total <= s.gpu.vram_bytes and not note
    timing = predict_time(config, chosen, s.gpu, s.gpus, s.total_batch, s.utilization,
                          s.utilization_source, s.assume, s.speed_factor)
    if not (math.isfinite(timing.step_s) and timing.tokens_per_s > 0):
        raise UsageError(f"recipe {chosen.name}: the predicted step time is not a finite number of seconds "
                         "(an assumed rate or utilization is too close to zero)")
    if tokens is None:  # the whole steps that fit (none, in a budget shorter than one step)
        tokens = int(seconds * timing.tokens_per_s) // s.total_batch * s.total_batch
    time_s = tokens / timing.tokens_per_s
    kwh = energy_kwh(time_s, s.power_watts or s.gpu.power_watts, s.gpus, s.assume)
    return Candidate(chosen, fits, memory, timing, tokens, time_s, kwh, kwh * s.price, note)


def candidates(config: GPTConfig, s: Settings, tokens: int | None = None, seconds: float | None = None,
               names: list[str] | None = None) -> list[Candidate]:
    """Every named recipe (or just `names`), from the plain nanochat way to the leanest."""
    return [evaluate(config, NAMED[n], s, tokens, seconds) for n in (names or list(NAMED))]


def fastest_fit(cands: list[Candidate]) -> Candidate | None:
    """The fitting candidate with the most tokens per second (the shortest time for given tokens,
    the most tokens in a given time)."""
    fitting = [c for c in cands if c.fits]
    return max(fitting, key=lambda c: c.timing.tokens_per_s) if fitting else None


def overflow(cands: list[Candidate], vram: int) -> str:
    """When nothing fits: the leanest candidate, by how much it overflows, and what is largest; or,
    where no recipe tried can run on the card at all (FP8 without FP8 tensor cores), why not."""
    runnable = [c for c in cands if not c.note]
    if not runnable:
        return "; ".join(f"{c.recipe.name} cannot run on this card: {c.note}" for c in cands)
    lean = min(runnable, key=lambda c: c.memory.total)
    parts = lean.memory.components()
    parts.pop("total")
    big = sorted(parts.items(), key=lambda kv: -kv[1])
    state = parts["weights"] + parts["grads"] + parts["optimizer"]
    gib = 2 ** 30
    why = (f"weights + gradients + optimizer states alone are {state / gib:.2f} GiB"
           if state > vram else
           f"{big[0][0]} {big[0][1] / gib:.2f} GiB and {big[1][0]} {big[1][1] / gib:.2f} GiB are the largest parts")
    return (f"even the leanest recipe ({lean.recipe.name}, micro-batch {lean.recipe.micro_batch}) needs "
            f"{lean.memory.total / gib:.2f} GiB of {vram / gib:.2f} GiB: "
            f"{(lean.memory.total - vram) / gib:.2f} GiB over; {why}")


def nearest_fit(depth: int, s: Settings, ratio: float | None, tokens: int | None = None, seconds: float | None = None,
                tried_all: bool = True) -> tuple[GPTConfig, Candidate] | None:
    """The nearest plan that fits: the same model with another recipe (when only some were tried),
    else the deepest smaller model with a recipe that fits. Its tokens: `tokens` when given, as many
    as fit in `seconds`, or else ratio x its parameters."""
    for d in range(depth if not tried_all else depth - 1, 0, -1):
        try:
            config = s.config(d)
        except UsageError:
            continue
        sd = for_model(s, config)
        n = tokens if tokens is not None or seconds is not None else default_tokens(config, sd, ratio)
        best = fastest_fit(candidates(config, sd, n, seconds))
        if best:
            return config, best
    return None


def horizon(config: GPTConfig) -> tuple[int, int, float]:
    """A family's defaults for how much a model trains: (tokens per step, the parameters its tokens-
    per-parameter ratio counts, that ratio). nanochat-2026's batch grows with depth and its ratio
    counts the matrices and lm_head (schedule_2026.py); the classic's counts every parameter."""
    if config.arch == ARCH_2026:
        return auto_total_batch(config), scaling_params(config), RATIO_2026
    return defaults.TOTAL_BATCH, config_params(config), defaults.RATIO


def for_model(s: Settings, config: GPTConfig) -> Settings:
    """The settings `config` trains with: its family's own batch, unless one was chosen."""
    return replace(s, total_batch=horizon(config)[0]) if s.family_batch else s


def default_tokens(config: GPTConfig, s: Settings, ratio: float | None) -> int:
    """Whole steps of `ratio` (else the family's) tokens per counted parameter."""
    _, counted, family_ratio = horizon(config)
    return whole_steps((ratio or family_ratio) * counted, s.total_batch)


def config_params(config: GPTConfig) -> int:
    """All parameters, embeddings included: what tokens-per-parameter ratios count (nanochat)."""
    return sum(param_counts(config).values())


def budget(s: Settings, days: float, ratio: float | None, keep: int = 5,
           names: list[str] | None = None) -> list[tuple[GPTConfig, Candidate]]:
    """The largest models trainable in `days` at `ratio` tokens per parameter, largest first: every
    depth `--model` takes (a search that stopped short named a smaller model the best)."""
    found = []
    for depth in range(1, MAX_DEPTH + 1):
        try:
            config = s.config(depth)
        except UsageError:  # heads do not divide the width at this depth
            continue
        sd = for_model(s, config)
        best = fastest_fit(candidates(config, sd, default_tokens(config, sd, ratio), names=names))
        if best is None:
            break  # deeper models will not fit either
        if best.time_s <= days * 86400:
            found.append((config, best))
    return sorted(found, key=lambda cb: -cb[0].n_layer)[:keep]


def breakdown(memory: Memory) -> str:
    """'weights 2.10, grads 1.05, ... total 9.48 GiB, host 15.2 GiB': one line of a recipe's memory."""
    gib = 2 ** 30
    parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in memory.components().items())
    return f"{parts} GiB on the card; {memory.host / gib:.2f} GiB of host RAM"


def pick_recipe(config: GPTConfig, s: Settings, tokens: int, name: str | None = None,
                overrides: dict | None = None, host_bytes: int | None = None,
                why_not: Callable[[Recipe], str | None] | None = None) -> Candidate:
    """The recipe a training run executes on the card of `s`: the named one, or else the fastest
    named recipe that fits; each with the fields of `overrides` set. `why_not` says why this
    machine cannot run a recipe (a library missing, no CUDA), or None. Raises UsageError with the
    planner's breakdown where it cannot run: too little VRAM, no FP8, too little host RAM."""
    overrides = overrides or {}
    bases = [named_recipe(name)] if name else list(NAMED.values())
    cands = []
    for base in bases:
        try:
            recipe = base.overridden(**overrides)
        except UsageError:
            if name:
                raise
            continue  # this override does not combine with this recipe (e.g. grads=cpu on the GPU)
        cand = evaluate(config, recipe, s, tokens)
        missing = why_not(recipe) if why_not else None
        if missing and not cand.note:
            cand = replace(cand, fits=False, note=missing)
        if host_bytes is not None and cand.memory.host > host_bytes:
            cand = replace(cand, fits=False, note=f"needs {cand.memory.host / 2**30:.1f} GiB of host RAM, "
                                                  f"{host_bytes / 2**30:.1f} GiB is free")
        cands.append(cand)
    best = fastest_fit(cands)
    if best:
        return best
    where = f"{s.gpu.name} ({s.gpu.vram_gib:g} GiB)"
    if name:
        cand = cands[0]
        why = cand.note or (f"it needs {cand.memory.total / 2**30:.2f} GiB at micro-batch "
                            f"{cand.recipe.micro_batch}")
        others = fastest_fit([c for c in candidates(config, s, tokens) if not (why_not and why_not(c.recipe))])
        hint = (f"recipe {others.recipe.name} fits (micro-batch {others.recipe.micro_batch})" if others
                else "no named recipe fits: a smaller model, a shorter --seq-len or a card with more memory")
        raise UsageError(f"recipe {cand.recipe.name} cannot run on {where}: {why}\n"
                         f"  planner's breakdown: {breakdown(cand.memory)}\n  {hint}")
    notes = "; ".join(f"{c.recipe.name}: {c.note}" for c in cands if c.note)
    raise UsageError(f"no recipe fits d{config.n_layer} on {where}: {overflow(cands, s.gpu.vram_bytes)}\n"
                     f"  leanest recipe's breakdown: {breakdown(min(cands, key=lambda c: c.memory.total).memory)}"
                     + (f"\n  also: {notes}" if notes else "")
                     + "\n  try a smaller model (onecard plan --days D shows the best that fits), a shorter "
                       "--seq-len, or a card with more memory")
