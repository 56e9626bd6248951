"""Which recipe a training run executes, what the planner predicts for it, and how that compares
with what the run measures.

`onecard train --gpu NAME` / `--vram GB` (or a CUDA card, detected) asks the planner for the
fastest recipe that fits; `--recipe NAME` and the per-field flags (--activations, --loss, ...)
override it. Without a card to fit to (a CPU run), the recipe is the named one or baseline.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import torch

from onecard.errors import UsageError
from onecard.model import GPTConfig, param_counts
from onecard.plan.catalog import GPU
from onecard.plan.cli import build_settings, choose_gpu
from onecard.plan.report import GiB, gpu_line, memory_lines, time_lines
from onecard.plan.search import Candidate, Settings, evaluate, host_memory_available, pick_recipe
from onecard.recipe import CHOICES, Recipe, named_recipe


@dataclass
class Choice:
    recipe: Recipe
    candidate: Candidate | None = None  # the planner's view, where there is a card to plan for
    settings: Settings | None = None
    notes: list[str] = field(default_factory=list)


def recipe_overrides(args) -> dict:
    """The per-field recipe flags given on the command line (--params bf16_sr, --compile, ...)."""
    changes = {key: getattr(args, key) for key in CHOICES if getattr(args, key, None) is not None}
    if getattr(args, "compile", None) is not None:
        changes["compile"] = args.compile
    return changes


def unrunnable_reason(recipe: Recipe, device: str) -> str | None:
    """Why this machine cannot execute `recipe` on `device` (a library missing, no CUDA), or None."""
    if recipe.matmul == "fp8":
        from onecard.fp8 import fp8_unavailable_reason
        reason = fp8_unavailable_reason(device)
        if reason:
            return reason
    if recipe.loss == "fused":
        from onecard.loss import fused_loss_function
        try:
            fused_loss_function(torch.device(device))
        except UsageError as error:
            return str(error)
    return None


def card_for(args, device: str) -> tuple[GPU | None, list[str]]:
    """The card to fit the recipe to, as `onecard plan` chooses it (--gpu, else the detected card;
    --vram resizes it), or None where none was asked for and this run has no card the catalog knows."""
    asked = args.gpu or args.vram is not None
    if not asked and device != "cuda":
        return None, []
    try:
        gpu, notes = choose_gpu(args)
    except UsageError as error:
        if asked:
            raise
        return None, [f"{error}; without it there is no prediction and the recipe is not fitted"]
    return gpu, [n for n in notes if n]


def choose_recipe(args, config: GPTConfig, device: str, *, seq_len: int, micro_batch: int | None,
                  total_batch: int, tokens: int, resumed: Recipe | None = None, gpus: int = 1) -> Choice:
    """The recipe this run executes. micro_batch None lets the planner pick the largest that fits
    (without a card: 8). A resumed run keeps its recipe unless the command line asks otherwise."""

    overrides = recipe_overrides(args)
    asked = bool(args.recipe or overrides or args.gpu or args.vram is not None)
    gpu, notes = card_for(args, device)
    if gpu is None:
        if resumed and not asked:
            return Choice(resumed.with_(seq_len=seq_len, micro_batch=micro_batch or resumed.micro_batch), notes=notes)
        recipe = named_recipe(args.recipe or "baseline", seq_len=seq_len, micro_batch=micro_batch or 8)
        recipe = recipe.overridden(**overrides)
        reason = unrunnable_reason(recipe, device)
        if reason:
            raise UsageError(f"recipe {recipe.name} cannot run here: {reason}")
        return Choice(recipe, notes=notes)

    s = build_settings(gpu, notes, gpus=gpus, seq_len=seq_len, total_batch=total_batch, micro_batch=micro_batch,
                       vocab_size=config.vocab_size, power=getattr(args, "power", None))
    if resumed and not asked:
        recipe = resumed.with_(seq_len=seq_len, micro_batch=micro_batch or resumed.micro_batch)
        return Choice(recipe, evaluate(config, recipe, replace(s, micro_batch=recipe.micro_batch), tokens), s, notes)
    host = host_memory_available() if device == "cuda" else None  # on the CPU the trainer's RAM is the GPU's
    # a dry run plans for the card named, whatever this machine can run; a real run must run here
    dry_run = getattr(args, "dry_run", False)
    candidate = pick_recipe(config, s, tokens, args.recipe, overrides, host,
                            why_not=None if dry_run else (lambda recipe: unrunnable_reason(recipe, device)))
    how = f"recipe {args.recipe}" if args.recipe else "the fastest recipe that fits"
    notes.append(f"{how} on {gpu.name} ({gpu.vram_gib:g} GiB): {candidate.recipe.name}, micro-batch "
                 f"{candidate.recipe.micro_batch}")
    reason = unrunnable_reason(candidate.recipe, device) if dry_run else None
    if reason:
        notes.append(f"this machine cannot run it ({reason}); a real run here would pick another")
    if device != "cuda":
        notes.append(f"this run is on the {device}: it executes the recipe chosen for {gpu.name}, but the "
                     "prediction is for that card and is not compared with this run")
    return Choice(candidate.recipe, candidate, s, notes)


def describe_recipe(recipe: Recipe) -> str:
    fields = ", ".join(f"{key} {getattr(recipe, key)}" for key in CHOICES)
    return (f"recipe {recipe.name}: {fields}, micro-batch {recipe.micro_batch} x {recipe.seq_len} tokens, "
            f"compile {'on' if recipe.compile else 'off'}")


def dry_run_text(choice: Choice, config: GPTConfig) -> str:
    """What --dry-run prints: the recipe, and its predicted memory and step time where a card is known."""
    lines = [describe_recipe(choice.recipe)] + [f"note: {n}" for n in choice.notes]
    c, s = choice.candidate, choice.settings
    if c is None:
        lines.append("no card to predict for: give --gpu NAME (and --vram GB) to see predicted memory and time")
        return "\n".join(lines)
    params = sum(param_counts(config).values())
    lines += [f"card: {gpu_line(s.gpu, s.gpus)}", *memory_lines(c, s, params), *time_lines(c, s)]
    return "\n".join(lines)


def prediction_record(choice: Choice, device: str) -> dict | None:
    """The planner's forecast the run stores (config.json, summary.json) and sets beside its
    measurement; only for a CUDA run, where the measurement is of the card predicted for."""
    c = choice.candidate
    if c is None or device != "cuda":
        return None
    return {"gpu": choice.settings.gpu.name, "recipe": c.recipe.name, "peak_bytes": c.memory.total,
            "peak_allocated_bytes": c.memory.allocated, "memory": c.memory.components(),
            "host_bytes": c.memory.host, "step_time_s": c.timing.step_s, "tokens_per_s": c.timing.tokens_per_s,
            "mfu": c.timing.mfu, "source": "onecard plan (predict_memory, predict_time)"}


def compare_text(prediction: dict, summary: dict, history: list[dict], total_batch: int) -> str:
    """Predicted against measured, side by side. The first step of a session (warm-up, compile)
    is left out of the measured step time."""
    times = [r["step_time_s"] for r in history[1:] if not r.get("skipped")] or \
        [r["step_time_s"] for r in history]
    measured_step = statistics.median(times) if times else None
    peak = summary.get("vram_peak_bytes")
    rows = [("peak allocated", f"{prediction['peak_allocated_bytes'] / GiB:.2f} GiB",
             "n/a" if peak is None else f"{peak / GiB:.2f} GiB (torch.cuda.max_memory_allocated)"),
            ("peak incl. context", f"{prediction['peak_bytes'] / GiB:.2f} GiB", "n/a (not measured by torch)"),
            ("step time", f"{prediction['step_time_s']:.3f} s",
             "n/a" if measured_step is None else f"{measured_step:.3f} s (median of {len(times)} steps)")]
    if measured_step:
        rows.append(("tokens/s", f"{prediction['tokens_per_s']:,.0f}",
                     f"{total_batch / measured_step:,.0f}"))
    lines = [f"{'':<20} {'predicted':>12}   measured ({prediction['gpu']}, recipe {prediction['recipe']})"]
    lines += [f"{name:<20} {pred:>12}   {meas}" for name, pred, meas in rows]
    return "\n".join(lines)
