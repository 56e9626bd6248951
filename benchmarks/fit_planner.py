"""Fit the planner's speed constants to what was measured and published, and show every row.

The planner (onecard/plan/timing.py) predicts a step's time from FLOPs, bytes and a few constants
(onecard/plan/assumptions.py). This script finds the constants that best explain

- every row `benchmarks/recipes_gpu.py` measured (benchmarks/results/**/recipes_gpu_*.json): the
  time of the measured optimizer step (its own tokens, micro-batches and update), predicted by the
  planner with the measuring card's catalog entry. Rows of recipes with grads=cpu were measured
  when the trainer folded gradients inside backward: they are predicted with grad_fold_overlap=0;
- the published compiled runs the compiled constants come from (below), compute only.

Least squares on log(predicted / measured), so a row 20 % slow weighs as much as one 20 % fast.
The fit goes through the planner's own predict_time: what is fitted is what `onecard plan` runs.
Needs scipy (not a onecard dependency):

    python benchmarks/fit_planner.py            # fit, print constants and the per-row table
    python benchmarks/fit_planner.py --check    # the current constants only, no fit
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onecard.defaults import VOCAB_SIZE  # noqa: E402
from onecard.model_config import GPTConfig, flops_per_token  # noqa: E402
from onecard.plan.assumptions import DEFAULT, Assumptions  # noqa: E402
from onecard.plan.catalog import CATALOG, GPU, find_gpu  # noqa: E402
from onecard.plan.timing import predict_time  # noqa: E402
from onecard.recipe import Recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Published compiled runs: (what, card, depth, vocabulary, micro-batch, MFU by model FLOPs).
PUBLISHED = [
    ("nanochat d20 speedrun, 8 x H100, report.md of commit af82c3a (MFU 47.4-48.7 %)", "h100-sxm", 20, 65536, 32, 0.48),
    ("nanochat d32 run1000.sh, 8 x H100, commit fae3aca (MFU 50.9 %)", "h100-sxm", 32, 65536, 8, 0.509),
]
# Checked, not fitted: one compiled GeForce run.
CHECKED = [
    ("nanoGPT GPT-2 124M, RTX 4090, compiled bf16 (karpathy/nanoGPT pull request 225: 55 %)", "rtx4090", 0.55),
]


@dataclass(frozen=True)
class Row:
    what: str
    gpu: GPU
    config: GPTConfig
    recipe: Recipe
    tokens: int  # per measured optimizer step
    step_s: float
    update_s: float | None = None  # the update alone, where the row timed it
    peak_allocated: int | None = None  # torch.cuda.max_memory_allocated of the step
    leaked: bool = False  # measured after a grads=cpu row in the same process (its weights leaked until ca1d5a3)

    @property
    def folded_in_backward(self) -> bool:
        """grads=cpu rows were measured when the trainer folded gradients inside backward."""
        return self.recipe.grads == "cpu"


def measured_rows(root: Path = RESULTS) -> list[Row]:
    """Every ran row of every recipes_gpu result under `root`."""
    rows = []
    for path in sorted(root.rglob("recipes_gpu_*.json")):
        result = json.loads(path.read_text())
        gpu = find_gpu(result["device"])[0]
        vocab = result.get("vocab_size", VOCAB_SIZE)  # the sessions before it was recorded ran the default
        leaked = False  # one process per file
        for r in result["rows"]:
            if r["outcome"] != "ran":
                continue
            recipe = Recipe.from_dict(r["recipe"])
            config = GPTConfig.from_depth(r["depth"], vocab_size=vocab, sequence_len=recipe.seq_len)
            tokens = round(r["tokens_per_s"] * r["step_s"])
            cap = r["cap_gib"] or "whole"
            what = f"{path.parent.name} d{r['depth']} {recipe.name} mb{recipe.micro_batch} cap {cap}"
            rows.append(Row(what, gpu, config, recipe, tokens, r["step_s"], r.get("update_s"),
                            r.get("max_memory_allocated"), leaked))
            leaked = leaked or recipe.grads == "cpu"
    return rows


def predicted(row: Row, assume: Assumptions):
    if row.folded_in_backward:
        assume = replace(assume, grad_fold_overlap=0.0)
    return predict_time(row.config, row.recipe, row.gpu, 1, row.tokens, assume=assume)


def predicted_step_s(row: Row, assume: Assumptions) -> float:
    return predicted(row, assume).step_s


def published_mfu(card: str, depth: int, vocab: int, micro_batch: int, assume: Assumptions) -> float:
    """The planner's compute-only MFU for a compiled, nothing-recomputed micro-batch."""
    config = GPTConfig.from_depth(depth, vocab_size=vocab)
    recipe = Recipe(micro_batch=micro_batch, compile=True)
    tokens = micro_batch * config.sequence_len
    t = predict_time(config, recipe, CATALOG[card], 1, tokens, assume=assume)
    return flops_per_token(config) * tokens / t.compute_s / CATALOG[card].peak_bf16


def gpt2_124m_mfu(card: str, assume: Assumptions) -> float:
    """nanoGPT's GPT-2 124M (12 layers, width 768, vocabulary 50,304, 12 x 1,024 tokens), compiled,
    with nanoGPT's MFU formula (6N with the tied head + 12LHQT), on `card`."""
    config = GPTConfig(sequence_len=1024, vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, n_embd=768)
    recipe = Recipe(micro_batch=12, seq_len=1024, compile=True)
    gpu = CATALOG[card]
    t = predict_time(config, recipe, gpu, 1, 12 * 1024, assume=assume)
    n = 12 * (12 * 768 * 768) + 50304 * 768  # blocks + the tied embedding/head
    flops = 6 * n + 12 * 12 * 768 * 1024
    return flops * 12 * 1024 / t.compute_s / gpu.peak_bf16


# Fitted in two stages: the GPU's speed from the rows that keep everything on the card (and the
# published runs), then the CPU's gradient folding from the grads=cpu rows with the rest fixed.
# The host's memory bandwidth (cpu_memory_bandwidth) keeps its sourced value: these rows cannot
# tell it apart from the folding cost.
GPU_FITTED = ("matmul_ceiling", "eager_overhead_width", "eager_layer_overhead_s", "optimizer_tensor_overhead_s",
              "fp8_eager_efficiency", "compiled_overhead_width")
CPU_FITTED = ("grad_fold_s_per_param",)
SCALE = {"eager_layer_overhead_s": 1e-3, "optimizer_tensor_overhead_s": 1e-3, "grad_fold_s_per_param": 1e-9}


def residuals(assume: Assumptions, rows: list[Row], published: bool) -> list[float]:
    out = []
    for r in rows:
        t = predicted(r, assume)
        out.append(math.log(t.step_s / r.step_s))
        if r.update_s and r.recipe.optim_place == "gpu":  # the update timed apart: the optimizer's own time
            out.append(math.log(t.optimizer_s / r.update_s))
    if published:
        out += [math.log(published_mfu(card, d, v, mb, assume) / mfu) for _, card, d, v, mb, mfu in PUBLISHED]
    return out


def fit_stage(assume: Assumptions, names: tuple[str, ...], rows: list[Row], published: bool) -> Assumptions:
    from scipy.optimize import least_squares

    def assume_of(x) -> Assumptions:
        return replace(assume, **{name: value * SCALE.get(name, 1.0) for name, value in zip(names, x, strict=True)})

    start = [getattr(assume, name) / SCALE.get(name, 1.0) for name in names]
    found = least_squares(lambda x: residuals(assume_of(x), rows, published), start,
                          bounds=([0.0] * len(names), [100.0] * len(names)))
    return assume_of(found.x)


def fit(rows: list[Row]) -> Assumptions:
    on_card = [r for r in rows if not r.folded_in_backward]
    assume = fit_stage(DEFAULT, GPU_FITTED, on_card, published=True)
    return fit_stage(assume, CPU_FITTED, [r for r in rows if r.folded_in_backward], published=False)


def report(assume: Assumptions, rows: list[Row]) -> list[float]:
    print("| measured step | tokens | measured s | predicted s | predicted / measured |")
    print("| --- | --- | --- | --- | --- |")
    ratios = []
    for r in rows:
        p = predicted_step_s(r, assume)
        ratios.append(p / r.step_s)
        print(f"| {r.what} | {r.tokens:,} | {r.step_s:.3f} | {p:.3f} | {p / r.step_s:.2f} |")
    print("\n| published run | MFU | planner (compute only) |\n| --- | --- | --- |")
    for what, card, d, v, mb, mfu in PUBLISHED:
        print(f"| {what} | {mfu:.1%} | {published_mfu(card, d, v, mb, assume):.1%} |")
    for what, card, mfu in CHECKED:
        print(f"| {what} (checked, not fitted) | {mfu:.1%} | {gpt2_124m_mfu(card, assume):.1%} |")
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report the current constants, do not fit")
    args = parser.parse_args()
    rows = measured_rows()
    assume = DEFAULT if args.check else fit(rows)
    if not args.check:
        print("fitted constants:")
        for name in GPU_FITTED + CPU_FITTED:
            print(f"  {name} = {getattr(assume, name):.4g}   (now {getattr(DEFAULT, name):.4g})")
        print()
    ratios = report(assume, rows)
    worst = max(abs(math.log(x)) for x in ratios)
    print(f"\n{len(rows)} measured rows; worst predicted/measured {math.exp(worst):.2f}x off "
          f"({sum(abs(x - 1) <= 0.15 for x in ratios)} within 15 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
