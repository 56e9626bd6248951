"""The lean recipes on a real CUDA card: memory and speed measured, next to the planner's prediction.

For each depth (default d20 and d32, vocabulary 65,536, context 2048), each memory cap (default:
the whole card, 12 GiB and 8 GiB, set with torch.cuda.set_per_process_memory_fraction so that a
large GPU stands in for a smaller one) and each named recipe, at the micro-batch the planner
picks for a card of that size, it trains a few optimizer steps exactly as `onecard train` does (onecard.step)
(build_model, set_policies, build_optimizer, bf16 autocast, accumulate, clip, step) and records:

- torch.cuda.max_memory_allocated over the last full step, against the planner's `allocated`
  (its total less the CUDA context, workspace and fragmentation margin, which
  max_memory_allocated does not see);
- the forward-backward and update times of that step, and from them tokens/s at a real step of
  --total-batch tokens (forward-backward per token x total batch + one update: measuring 256
  micro-batches of d32 would not fit a short lease); MFU by model FLOPs (nanochat's 6N + 12LHQT
  per token) and by hardware FLOPs (recompute included) at that rate, against this card's dense
  bf16 peak from the catalog; and the planner's predicted tokens/s and MFU for this card.

Recipes the planner says do not fit are run too: they should run out of memory. Results go to
benchmarks/results/recipes_gpu_<date>_<card>.json (device, date, command, commit) and a markdown
table is printed for benchmarks/README.md.

    python benchmarks/recipes_gpu.py                                  # d20, d32 x whole/12/8 GiB
    python benchmarks/recipes_gpu.py --depths 32 --caps 12 --recipes lean offload
    python benchmarks/recipes_gpu.py --device cpu --depths 2 --seq-len 64 --vocab-size 512 --caps 0
                                                                      # a smoke run of the loop
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import commit  # noqa: E402

from onecard.device import local_card
from onecard.measure import time_recipe_steps
from onecard.model import GPTConfig
from onecard.plan.catalog import CATALOG, GiB, with_vram
from onecard.plan.choose import choose_gpu
from onecard.plan.search import Settings, evaluate
from onecard.plan.timing import predict_time
from onecard.recipe import NAMED

HERE = Path(__file__).resolve().parent


def run_steps(config: GPTConfig, recipe, accum: int, steps: int, device: str, total_batch: int) -> dict:
    """The recipe's own step (onecard.measure, as `onecard train` and `onecard bench` run it); a recipe
    that fails on this card is a result too, and the other rows still run."""
    try:
        return time_recipe_steps(config, recipe, accum, steps, device, total_batch)
    except Exception as error:
        return {"outcome": "error", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}


def this_card(device: str, as_gpu: str | None):
    """The catalog entry whose peak the MFU is measured against and whose speed the plan assumes."""
    if as_gpu:
        return CATALOG[as_gpu]
    if device == "cuda":
        found = local_card()
        if found:
            return choose_gpu(None, None, found)[0]
    return CATALOG["rtx4070"]  # the CPU smoke run: any card, its figures are not reported as measured


def table(rows: list[dict]) -> str:
    lines = ["| depth | cap GiB | recipe | micro | predicted fits | predicted alloc GiB | measured alloc GiB "
             "| ratio | tokens/s at batch (pred.) | MFU model | MFU hardware | MFU pred. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ran = r["outcome"] == "ran"
        if "predicted_allocated" not in r:  # the measuring process itself failed
            lines.append(f"| d{r['depth']} | {r['cap_gib'] or 'whole'} | {r['recipe']['name']} | | | | {r['outcome']} "
                         "| | | | | |")
            continue
        alloc = f"{r['max_memory_allocated'] / GiB:.2f}" if "max_memory_allocated" in r and ran else r["outcome"]
        lines.append(
            f"| d{r['depth']} | {r['cap_gib'] or 'whole'} | {r['recipe']['name']} | {r['recipe']['micro_batch']} "
            f"| {'yes' if r['predicted_fits'] else 'no'} | {r['predicted_allocated'] / GiB:.2f} | {alloc} "
            f"| {r.get('allocated_ratio', float('nan')):.3f} "
            f"| {r.get('tokens_per_s_at_batch', 0):,.0f} ({r['predicted_tokens_per_s']:,.0f}) "
            f"| {r.get('mfu_model', 0):.1%} | {r.get('mfu_hardware', 0):.1%} | {r['predicted_mfu']:.1%} |")
    return "\n".join(lines)


def measure_row(args, card, total: int, depth: int, cap_gib: float, name: str) -> dict | None:
    """One recipe x depth x cap: the planner's prediction and the measurement side by side."""
    cuda = args.device == "cuda"
    cap = cap_gib * GiB if cap_gib else total
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    settings = Settings(gpu=with_vram(card, cap / GiB), seq_len=args.seq_len, vocab_size=args.vocab_size,
                        total_batch=args.total_batch, compile=args.compile)
    config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    planned = evaluate(config, NAMED[name], settings, tokens=1)
    recipe = planned.recipe
    if recipe.matmul == "fp8" and (not cuda or torch.cuda.get_device_capability() < (8, 9)):
        return None
    timing = predict_time(config, recipe, settings.gpu, 1, args.total_batch)
    measured = run_steps(config, recipe, args.accum, args.steps, args.device, args.total_batch)
    row = {"depth": depth, "cap_gib": cap_gib, "recipe": recipe.to_dict(),
           "predicted_fits": planned.fits, "predicted_allocated": planned.memory.allocated,
           "predicted_total": planned.memory.total, "predicted_components": planned.memory.components(),
           "predicted_tokens_per_s": timing.tokens_per_s, "predicted_mfu": timing.mfu, **measured}
    if measured["outcome"] == "ran":
        rate = measured["tokens_per_s_at_batch"]
        row["mfu_model"] = timing.model_flops_per_token * rate / card.peak_bf16
        row["mfu_hardware"] = timing.hardware_flops_per_token * rate / card.peak_bf16
        if "max_memory_allocated" in measured:
            row["allocated_ratio"] = measured["max_memory_allocated"] / planned.memory.allocated
    return row


def row_line(row: dict) -> str:
    ran = row["outcome"] == "ran"
    got = (f"{row['max_memory_allocated'] / GiB:.2f} GiB" if ran and "max_memory_allocated" in row
           else row["outcome"] + (f" ({row['error']})" if "error" in row else ""))
    speed = f", {row['tokens_per_s_at_batch']:,.0f} tok/s at batch" if ran else ""
    if ran and row.get("first_step_s"):
        speed += f", first step {row['first_step_s']:,.1f} s"
    if "compile_failed" in row:
        speed += f" (EAGER: the compile failed: {row['compile_failed'][:120]})"
    predicted = (f"predicted {row['predicted_allocated'] / GiB:.2f} GiB "
                 f"({'fits' if row['predicted_fits'] else 'does not fit'}), " if "predicted_allocated" in row else "")
    return (f"cap {row['cap_gib'] or 'whole'} d{row['depth']} {row['recipe']['name']:<12} micro-batch "
            f"{row['recipe'].get('micro_batch', '?'):>2}: {predicted}measured {got}{speed}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--caps", type=float, nargs="+", default=[0, 12, 8],
                        help="memory caps in GiB standing in for smaller cards (0: the whole card)")
    parser.add_argument("--recipes", nargs="+", default=list(NAMED), choices=list(NAMED))
    parser.add_argument("--as-gpu", choices=list(CATALOG), help="catalog card for peak and plan (default: detected)")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per measured step")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the last one is measured)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--total-batch", type=int, default=524288,
                        help="tokens per optimizer step that tokens/s and MFU are scaled to (nanochat's 524288)")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="run every recipe with torch.compile (default: eager)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new run after this many seconds (0: none)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # DEPTH:CAP:RECIPE, run by main in a process of its own
    args = parser.parse_args()
    began = time.monotonic()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2

    card = this_card(args.device, args.as_gpu)
    total = torch.cuda.get_device_properties(0).total_memory if cuda else int(card.vram_bytes)
    if args.row:  # one measurement, in a process of its own (see below); its row is the last line printed
        depth, cap_gib, name = args.row.split(":")
        print(json.dumps(measure_row(args, card, total, int(depth), float(cap_gib), name)))
        return 0

    stamp = datetime.now(timezone.utc)
    device = torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)"
    result = {"device": device, "device_memory_bytes": total, "peak_bf16_flops": card.peak_bf16,
              "peak_source": card.source, "date": stamp.isoformat(), "commit": commit(), "torch": torch.__version__,
              "command": " ".join(sys.argv), "vocab_size": args.vocab_size, "rows": []}
    rows = result["rows"]
    args.out.mkdir(parents=True, exist_ok=True)
    card_name = device.replace(" ", "_").replace("(", "").replace(")", "")
    path = args.out / f"recipes_gpu_{stamp:%Y%m%d-%H%M%S}_{card_name}.json"
    for cap_gib in args.caps:
        for depth in args.depths:
            for name in args.recipes:
                if args.budget_s and time.monotonic() - began > args.budget_s:
                    print(f"time budget spent: cap {cap_gib} d{depth} {name} not run", flush=True)
                    continue
                # Each measurement runs in a fresh process: memory a run that ran out of it still holds
                # (tracebacks, the allocator's cache) must not count against the next one.
                done = subprocess.run([sys.executable, *sys.argv, "--row", f"{depth}:{cap_gib}:{name}"],
                                      capture_output=True, text=True)
                try:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    row = {"depth": depth, "cap_gib": cap_gib, "recipe": {"name": name}, "outcome": "error",
                           "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                if row is None:
                    continue  # fp8 where the card has none
                rows.append(row)
                path.write_text(json.dumps(result, indent=2))  # after every row: a killed run keeps what it did
                print(row_line(row), flush=True)

    path.write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
