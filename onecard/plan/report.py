"""Turn a plan into words (the table and the arithmetic behind it), JSON, and a picture."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from onecard import defaults
from onecard.datasources import format_bytes
from onecard.errors import UsageError
from onecard.model_config import GPTConfig, flops_per_token, param_counts
from onecard.plan.catalog import GPU
from onecard.plan.persistent import checkpoint_bytes
from onecard.plan.search import Candidate, Settings, config_params, for_model, horizon
from onecard.recipe import CHOICES, Recipe
from onecard.units import format_duration, quantity

GiB = 2**30


def amount(x: float) -> str:
    """A quantity as people read it: whole units from 10 up, two significant digits below (0.32 kWh, not 0)."""
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.2g}"


def seconds(x: float) -> str:
    """A part of a step's time: tenths from 10 s up, three significant digits below (0.028 s, not 0.0)."""
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def describe(recipe: Recipe, every_field: bool = False) -> str:
    """A recipe's choices: short for the table (weights/grads/states, activations, loss, matmul),
    or every field for --dry-run and the log."""
    if every_field:
        fields = ", ".join(f"{key} {getattr(recipe, key)}" for key in CHOICES)
        return (f"recipe {recipe.name}: {fields}, micro-batch {recipe.micro_batch} x {recipe.seq_len} tokens, "
                f"compile {'on' if recipe.compile else 'off'}")
    states = recipe.optim_states + ("@cpu" if recipe.optim_place == "cpu" else "")
    return (f"{recipe.params}/{recipe.grads}/{states} {recipe.activations} {recipe.loss}"
            + (" fp8" if recipe.matmul == "fp8" else ""))


def gpu_line(gpu: GPU, gpus: int) -> str:
    fp8 = f"{gpu.peak_fp8 / 1e12:.1f} TFLOP/s fp8" if gpu.peak_fp8 else "no fp8"
    count = f"{gpus} x " if gpus > 1 else ""
    return (f"{count}{gpu.name}: {gpu.vram_gib:.2f} GiB, {gpu.peak_bf16 / 1e12:.1f} TFLOP/s bf16 dense, "
            f"{fp8}, {gpu.power_watts:g} W, PCIe {gpu.pcie[0]}.0 x{gpu.pcie[1]}, {gpu.sm}")


def card_note(gpu: GPU) -> list[str]:
    """What the catalog says a card's figures do not show (no bf16 tensor cores, a power limit, --vram)."""
    return [f"        note: {gpu.note}"] if gpu.note else []


def table(cands: list[Candidate], s: Settings, by_tokens: bool = False) -> list[str]:
    """One row a recipe; `by_tokens` (a time budget): the tokens each trains in it, instead of the time."""
    last = "tokens" if by_tokens else "time"
    head = (f"  {'recipe':<14} {'weights/grads/states act loss':<40} {'micro':>5} {'peak VRAM':>10} {'fits':>4} "
            f"{'MFU':>6} {'tokens/s':>9} {last:>15} {'energy':>11} {'cost':>13}")
    lines = [head]
    for c in cands:
        fits = "yes" if c.fits else ("n/a" if c.note else "no")
        shown = f"{c.tokens:,}" if by_tokens else format_duration(c.time_s)
        lines.append(f"  {c.recipe.name:<14} {describe(c.recipe):<40} {c.recipe.micro_batch:>5} "
                     f"{c.memory.total / GiB:>6.2f} GiB {fits:>4} {c.timing.mfu:>6.1%} {c.timing.tokens_per_s:>9,.0f} "
                     f"{shown:>15} {amount(c.energy_kwh):>7} kWh {c.cost:>9,.2f} {s.currency}")
        if c.note:
            lines.append(f"  {'':<14} ({c.note})")
    return lines


def memory_lines(c: Candidate, s: Settings, params: int, arch: str = "classic") -> list[str]:
    m, a, r, assume = c.memory, c.memory.activation_detail, c.recipe, s.assume
    where = "on the CPU" if r.optim_place == "cpu" else f"{r.optim_states}"
    pieces = [("saved", a.saved), ("autocast's bf16 weight copies", a.weight_copies)]
    if r.activations == "offload":
        pieces += [("offload window", a.recompute), ("backward temporaries", a.working)]
    else:
        pieces.append(("a block's backward beyond the loss's peak", m.block_backward))
    act = " + ".join(f"{what} {value / GiB:.2f}" for what, value in pieces if value)
    if r.activations != "offload":
        after = [f"re-run part {a.recompute / GiB:.2f}"] if a.recompute else []
        after.append(f"backward temporaries {a.working / GiB:.2f}")
        within = "" if m.block_backward else ", within its peak"
        act += f" ({' + '.join(after)} come after the loss's backward{within})"
    rows = [("weights", m.weights, f"{r.params} ({params:,} parameters)"),
            ("gradients", m.grads, "window in flight to CPU RAM" if r.grads == "cpu" else r.grads),
            ("optimizer states", m.optimizer, ("Muon momentum" if arch == "classic" else
                                               "Muon momentum and NorMuon's second moment")
             + f" + AdamW moments, {where}"
             + (f"; the share of the card holding the most of {s.gpus}" if s.gpus > 1 else "")),
            ("activations", m.activations, act),
            ("logits / loss", m.logits, f"loss={r.loss} at its peak, gradients included"),
            ("rotary tables", m.buffers, "cos/sin for 10x the sequence, bf16"),
            ("CUDA context", m.context, "assumed: cuda_context_bytes"),
            ("workspace", m.workspace, "assumed: workspace_bytes (cuBLAS, attention, NCCL)"),
            ("fragmentation", m.fragmentation, f"assumed: {assume.fragmentation:.0%} of the allocated peak")]
    lines = [f"Memory at the peak (start of backward), micro-batch {r.micro_batch} x {r.seq_len} tokens:"]
    lines += [f"  {name:<18} {value / GiB:>7.2f} GiB   {why}" for name, value, why in rows
              if round(value / GiB, 2) or name == "weights"]
    free = s.gpu.vram_bytes - m.total
    lines.append(f"  {'total':<18} {m.total / GiB:>7.2f} GiB   of {s.gpu.vram_gib:.2f} GiB "
                 f"({'%.2f GiB free' % (free / GiB) if free >= 0 else '%.2f GiB over' % (-free / GiB)}); "
                 f"torch.cuda.max_memory_allocated should read {m.allocated / GiB:.2f} GiB")
    if m.host:
        each = f" for each of the {s.gpus} cards' processes" if s.gpus > 1 else ""
        lines.append(f"  {'CPU RAM':<18} {m.host / GiB:>7.2f} GiB   master weights, gradients, optimizer states "
                     f"or activations kept in host memory{each}")
    return lines


def time_lines(c: Candidate, s: Settings) -> list[str]:
    t, gpu = c.timing, s.gpu
    model_flops = t.model_flops_per_token * c.tokens
    hw_flops = t.hardware_flops_per_token * c.tokens
    steps = c.tokens / s.total_batch
    extra = []
    if c.recipe.activations == "full":
        extra.append("every block's forward again")
    if c.recipe.activations == "selective":
        extra.append("every MLP's forward again")
    if c.recipe.loss == "chunked":
        extra.append("the head's forward again, chunk by chunk")
    pcie_bw = gpu.pcie_bytes_per_s * s.assume.pcie_efficiency
    lines = ["Time:",
             f"  model FLOPs        {model_flops:.3e} = {t.model_flops_per_token:.4e} FLOPs/token"
             f" x {c.tokens:.4e} tokens",
             f"  hardware FLOPs     {hw_flops:.3e} = {t.hardware_flops_per_token / t.model_flops_per_token:.3f} x model"
             + (f" (recompute: {', '.join(extra)})" if extra else " (nothing recomputed)")]
    if t.fp8_flops_per_token:
        share = t.fp8_flops_per_token / t.hardware_flops_per_token
        rate = (f"{gpu.peak_fp8 / 1e12:.1f} TFLOP/s x {s.assume.fp8_efficiency:.0%} (fp8_efficiency, compiled)"
                if c.recipe.compile else
                f"{gpu.peak_bf16 / 1e12:.1f} TFLOP/s x {s.assume.fp8_eager_efficiency:.0%} "
                "(fp8_eager_efficiency: without compile fp8 is slower than bf16)")
        lines.append(f"  of which fp8       {share:.0%} (block linears) at {rate}")
    lines += [f"  peak               {gpu.peak_bf16 / 1e12:.1f} TFLOP/s bf16 dense per card (source above)",
              f"  utilization        {t.utilization:.0%} of peak assumed: {t.utilization_source}",
              f"  per step           {seconds(t.compute_s)} s GPU compute + {seconds(t.optimizer_s)} s optimizer "
              + ("(each card's part, as its share of the optimizer states, of " if s.gpus > 1 else "(")
              + f"Newton-Schulz {t.optimizer_flops_per_step:.2e} FLOPs + update) + {seconds(t.pcie_s)} s PCIe"
              + (f" + {seconds(t.comm_s)} s exchange between cards" if s.gpus > 1 else "")
              + (f" + {seconds(t.grad_fold_s)} s CPU gradient folding" if t.grad_fold_s else "")
              + f" = {seconds(t.step_s)} s for {s.total_batch:,} tokens"]
    if t.pcie_bytes:
        lines.append(f"  PCIe               {t.pcie_bytes / 1e9:,.1f} GB per step at {pcie_bw / 1e9:.1f} GB/s "
                     f"({s.assume.pcie_efficiency:.0%} of PCIe {gpu.pcie[0]}.0 x{gpu.pcie[1]}), "
                     f"{s.assume.pcie_overlap:.0%} hidden behind compute")
    lines += [f"  throughput         {t.tokens_per_s:,.0f} tokens/s = MFU {t.mfu:.1%} (model FLOPs / peak)",
              f"  wall time          {format_duration(c.time_s)} ({quantity(round(steps), 'step')})"]
    watts = (s.power_watts or gpu.power_watts) * s.assume.power_fraction * s.gpus + s.assume.overhead_watts
    boards = f"{s.gpus} cards' board power" if s.gpus > 1 else "the card's board power"
    what = (f"{boards} alone: add the rest of the computer with --assume overhead_watts=W"
            if not s.assume.overhead_watts else f"cards + {s.assume.overhead_watts:g} W for the rest of the computer")
    lines.append(f"Energy and cost: {watts:,.0f} W ({what}) x {amount(c.time_s / 3600)} h = {amount(c.energy_kwh)} "
                 f"kWh -> {c.cost:,.2f} {s.currency} at {s.price:g} {s.currency}/kWh")
    return lines


def disk_line(config: GPTConfig, recipe: Recipe, keep: int = defaults.KEEP) -> str:
    """The disk the run's checkpoints take: `keep` of them and one more while it is written."""
    each = checkpoint_bytes(config, recipe)
    return (f"Disk: checkpoints about {format_bytes(each)} each (weights and optimizer states); {keep} kept + 1 "
            f"being written = {format_bytes(each * (keep + 1))} (--keep N)")


def header(config: GPTConfig, s: Settings, tokens_line: str, notes: list[str], data_line: str = "") -> list[str]:
    params = config_params(config)
    lines = [f"model   d{config.n_layer}: {params:,} parameters, {flops_per_token(config):.4e} training FLOPs/token "
             f"(nanochat's 6N + 12LHQT), width {config.n_embd}, {config.n_head} heads, vocab {config.vocab_size:,}",
             f"card    {gpu_line(s.gpu, s.gpus)}",
             f"        source: {s.gpu.source}"] + card_note(s.gpu) + [
             f"tokens  {tokens_line}"] + ([f"data    {data_line}"] if data_line else [])
    return lines + [f"note    {n}" for n in notes if n]


def plan_text(config: GPTConfig, s: Settings, cands: list[Candidate], best: Candidate | None,
              tokens_line: str, notes: list[str], why_none: str = "", nearest=None, data_line: str = "",
              command: str = "", days: float | None = None) -> str:
    """The plan as text; with `days`, each recipe's row says how many tokens it trains in that time."""
    lines = header(config, s, tokens_line, notes, data_line) + [""] + table(cands, s, by_tokens=days is not None)
    lines.append("")
    if best is None:
        lines.append(f"Nothing fits: {why_none}")
        if nearest:
            cfg, c = nearest
            lines.append(f"Nearest plan that fits: d{cfg.n_layer} ({config_params(cfg):,} parameters) "
                         f"with {c.recipe.name}, "
                         f"micro-batch {c.recipe.micro_batch}: {c.memory.total / GiB:.2f} GiB, "
                         f"{c.tokens:,} tokens in {format_duration(c.time_s)}, {amount(c.energy_kwh)} kWh, "
                         f"{c.cost:,.2f} {s.currency}")
        return "\n".join(lines)
    if len(cands) == 1:  # --recipe NAME: the one asked for, not a pick among others
        lines.append(f"Plan: {best.recipe.name} ({describe(best.recipe)}), the recipe asked for (--recipe); it fits")
    else:
        why = (f"the one that trains the most tokens in {quantity(days, 'day')}" if days
               else "the fastest recipe that fits")
        lines.append(f"Recommended: {best.recipe.name} ({describe(best.recipe)}), {why}")
    if command:
        lines.append(f"Run it: {command}")
    for c in cands:  # near misses: faster recipes less than a quarter of the card over
        if (not c.fits and not c.note and c.time_s < best.time_s
                and c.memory.total - s.gpu.vram_bytes < s.gpu.vram_bytes / 4):
            over, margin = c.memory.total - s.gpu.vram_bytes, c.memory.fragmentation
            hint = (" (less than the assumed fragmentation margin: with PYTORCH_CUDA_ALLOC_CONF="
                    "expandable_segments:True it may fit; check with `onecard bench`)" if over < margin else "")
            lines.append(f"  faster but over the card: {c.recipe.name} ({format_duration(c.time_s)}) needs "
                         f"{c.memory.total / GiB:.2f} GiB, {over / GiB:.2f} GiB too much{hint}")
    lines += (memory_lines(best, s, config_params(config), config.arch) + time_lines(best, s)
              + [disk_line(config, best.recipe)])
    return "\n".join(lines)


def budget_text(s: Settings, days: float, ratio: float | None, found: list, notes: list[str],
                command: str = "") -> str:
    lines = [f"card    {gpu_line(s.gpu, s.gpus)}", f"        source: {s.gpu.source}"] + card_note(s.gpu)
    lines += [f"note    {n}" for n in notes if n]
    counted = "parameter" if s.arch == "classic" else "matrix and lm_head parameter, each depth's own batch"
    per = f"{ratio or horizon(s.config(1))[2]:g} tokens per {counted}"
    lines.append(f"budget  {quantity(days, 'day')}, {per}, sequence {s.seq_len}")
    if not found:
        lines.append("No model of depth 1 or more finishes in that time with a recipe that fits.")
        return "\n".join(lines)
    lines += ["", f"  {'model':<6} {'params':>14} {'tokens':>17} {'recipe':<14} {'micro':>5} {'peak VRAM':>10} "
                  f"{'time':>12} {'energy':>11} {'cost':>13}"]
    for config, c in found:
        lines.append(f"  d{config.n_layer:<5} {config_params(config):>14,} {c.tokens:>17,} {c.recipe.name:<14} "
                     f"{c.recipe.micro_batch:>5} {c.memory.total / GiB:>6.2f} GiB {format_duration(c.time_s):>12} "
                     f"{amount(c.energy_kwh):>7} kWh {c.cost:>9,.2f} {s.currency}")
    config, best = found[0]
    lines += ["", f"Best: d{config.n_layer} with {best.recipe.name} ({describe(best.recipe)})"]
    if command:
        lines.append(f"Run it: {command}")
    lines += memory_lines(best, s, config_params(config), config.arch) + time_lines(best, for_model(s, config))
    lines.append(disk_line(config, best.recipe))
    return "\n".join(lines)


# ---------------------------------------------------------------- JSON

def candidate_json(c: Candidate, s: Settings) -> dict:
    a = c.memory.activation_detail
    memory = c.memory.components() | {
        "allocated": c.memory.allocated, "host": c.memory.host,
        "detail": {"buffers": c.memory.buffers,
                   "cuda_context": c.memory.context, "workspace": c.memory.workspace,
                   "fragmentation": c.memory.fragmentation, "activations_saved": a.saved,
                   "autocast_weight_copies": a.weight_copies, "recompute": a.recompute,
                   "backward_temporaries": a.working, "block_backward": c.memory.block_backward}}
    t = c.timing
    return {"recipe": c.recipe.to_dict(), "fits": c.fits, "note": c.note or None, "memory": memory,
            "mfu": t.mfu, "utilization": t.utilization, "tokens_per_s": t.tokens_per_s, "tokens": c.tokens,
            "time_s": c.time_s, "step_s": t.step_s, "energy_kwh": c.energy_kwh,
            "cost": {"amount": c.cost, "currency": s.currency}}


def gpu_json(gpu: GPU) -> dict:
    return {"name": gpu.name, "key": gpu.key, "vram_bytes": gpu.vram_bytes, "peak_bf16_flops": gpu.peak_bf16,
            "peak_fp8_flops": gpu.peak_fp8, "power_watts": gpu.power_watts,
            "memory_bandwidth": gpu.memory_bandwidth, "compute_capability": list(gpu.compute_capability),
            "pcie": {"generation": gpu.pcie[0], "lanes": gpu.pcie[1]}, "source": gpu.source,
            "note": gpu.note or None}


def model_json(config: GPTConfig) -> dict:
    return {"depth": config.n_layer, "params": config_params(config), "flops_per_token": flops_per_token(config),
            "config": config.to_dict()}


def plan_json(config: GPTConfig, s: Settings, cands: list[Candidate], best: Candidate | None,
              tokens: int, notes: list[str], why_none: str = "", nearest=None) -> dict:
    out = {"model": model_json(config), "gpu": gpu_json(s.gpu), "gpus": s.gpus, "tokens": tokens,
           "seq_len": s.seq_len, "total_batch": s.total_batch,
           "utilization_source": cands[0].timing.utilization_source if cands else "",
           "assumptions": asdict(s.assume), "notes": [n for n in notes if n],
           "candidates": [candidate_json(c, s) for c in cands],
           "best": candidate_json(best, s) if best else None}
    if best is None:
        out["reason"] = why_none
        if nearest:
            cfg, c = nearest
            out["nearest"] = {"model": model_json(cfg), "best": candidate_json(c, s)}
    return out


def budget_json(s: Settings, days: float, ratio: float | None, found: list, notes: list[str]) -> dict:
    entries = [{"model": model_json(cfg), "tokens": c.tokens, "best": candidate_json(c, for_model(s, cfg))}
               for cfg, c in found]
    top = entries[0] if entries else {"model": None, "tokens": 0, "best": None}
    out = {"model": top["model"], "gpu": gpu_json(s.gpu), "gpus": s.gpus, "tokens": top["tokens"],
           "days": days, "ratio": ratio or horizon(s.config(1))[2],
           "seq_len": s.seq_len, "total_batch": for_model(s, found[0][0]).total_batch if found else s.total_batch,
           "assumptions": asdict(s.assume), "notes": [n for n in notes if n],
           "best": top["best"], "alternatives": entries[1:]}
    if not entries:
        out["reason"] = f"no model finishes in {quantity(days, 'day')} with a recipe that fits"
    return out


# ---------------------------------------------------------------- picture

PLOT_FORMATS = (".png", ".svg", ".pdf")  # formats matplotlib writes with no extra package


def check_plot_path(path: str) -> None:
    """Refuse a --plot path that cannot be written before any work, in one line."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"--plot {path}: is a directory; give a file name such as plan.png")
    if target.suffix.lower() not in PLOT_FORMATS:
        raise UsageError(f"--plot {path}: give a file name ending in {', '.join(PLOT_FORMATS)}")
    if not parent.is_dir():
        raise UsageError(f"--plot {path}: the folder {parent} does not exist (or is not a folder)")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--plot {path}: cannot write in {parent}")


def plot(cands: list[Candidate], s: Settings, path: str, title: str) -> None:
    """Memory by component per recipe (against the card's VRAM) and time per recipe."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.recipe.name for c in cands]
    parts = ["weights", "grads", "optimizer", "activations", "logits", "other"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bottom = [0.0] * len(cands)
    for part in parts:
        values = [c.memory.components()[part] / GiB for c in cands]
        left.bar(names, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.axhline(s.gpu.vram_gib, color="black", linestyle="--", label=f"VRAM {s.gpu.vram_gib:g} GiB")
    left.set_ylabel("GiB at the peak")
    left.set_title("memory by component")
    left.legend(fontsize=8)
    days = [c.time_s / 86400 for c in cands]
    right.bar(names, days, color=["tab:green" if c.fits else "tab:gray" for c in cands])
    right.set_ylabel("days")
    right.set_title("wall time (green: fits)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dry_run_text(recipe: Recipe, candidate: Candidate | None, s: Settings | None, notes: list[str],
                 config: GPTConfig) -> str:
    """What --dry-run prints: the recipe, and its predicted memory and step time where a card is known."""
    lines = [describe(recipe, every_field=True)] + [f"note: {n}" for n in notes]
    if candidate is None:
        lines.append("no card to predict for: give --gpu NAME (and --vram GB) to see predicted memory and time")
        return "\n".join(lines)
    params = sum(param_counts(config).values())
    lines += [f"card: {gpu_line(s.gpu, s.gpus)}", f"      source: {s.gpu.source}",
              *memory_lines(candidate, s, params, config.arch), *time_lines(candidate, s)]
    return "\n".join(lines)
