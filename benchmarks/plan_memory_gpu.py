"""The planner's memory (and speed) prediction against a real CUDA card.

For d20 and d32 and each named recipe, at the micro-batch the planner picks for a card of
--cap-gib GiB, it runs training steps exactly as onecard.train does (bf16 autocast, wte in bf16,
set_policies, build_optimizer, accumulate), with the process capped to --cap-gib by
torch.cuda.set_per_process_memory_fraction so that a large GPU stands in for a 12 GB one, and
compares torch.cuda.max_memory_allocated over a full optimizer step with the planner's
`allocated` (its total minus the CUDA context, workspace and fragmentation margin, which
max_memory_allocated does not see). Recipes the planner says do not fit are run too: they should
run out of memory. Results go to benchmarks/results/plan_memory_<date>_<card>.json with the
device, date, command and commit.

    python benchmarks/plan_memory_gpu.py                  # d20 and d32, every recipe, 12 GiB cap
    python benchmarks/plan_memory_gpu.py --depths 20 --recipes lean offload --cap-gib 0   # no cap
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from onecard.model import GPTConfig, build_model
from onecard.optim import build_optimizer
from onecard.plan.catalog import GiB, find_gpu, with_vram
from onecard.plan.memory import predict_memory
from onecard.plan.search import Settings, evaluate
from onecard.recipe import NAMED

HERE = Path(__file__).resolve().parent


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_steps(config: GPTConfig, recipe, accum: int, steps: int, device: str = "cuda") -> dict:
    """Train `steps` optimizer steps of `accum` micro-batches; peak memory of the last one, and its time."""
    model = build_model(config, device=device)
    if device == "cuda":
        model.transformer.wte.to(dtype=torch.bfloat16)  # as onecard.train does on CUDA
    model.set_policies(recipe.activations, recipe.loss)
    opt = build_optimizer(model, recipe)
    idx = torch.randint(0, config.vocab_size, (recipe.micro_batch, recipe.seq_len), device=device)
    cuda = device == "cuda"
    try:
        for step in range(steps):
            if step == steps - 1:  # the states exist now: measure a whole step from here
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            for _ in range(accum):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    loss = model(idx, idx)
                (loss / accum).backward()
                opt.accumulate()
            opt.step()
            opt.zero_grad()
        if not cuda:  # a smoke run of this loop on the CPU: no memory statistics there
            return {"outcome": "ran", "step_s": time.perf_counter() - start}
        torch.cuda.synchronize()
        step_s = time.perf_counter() - start
        return {"outcome": "ran", "max_memory_allocated": torch.cuda.max_memory_allocated(),
                "max_memory_reserved": torch.cuda.max_memory_reserved(), "step_s": step_s,
                "tokens_per_s": accum * recipe.micro_batch * recipe.seq_len / step_s}
    except torch.OutOfMemoryError as error:
        return {"outcome": "out of memory", "max_memory_allocated": torch.cuda.max_memory_allocated(),
                "error": str(error).splitlines()[0]}
    finally:
        del model, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--recipes", nargs="+", default=list(NAMED), choices=list(NAMED))
    parser.add_argument("--cap-gib", type=float, default=12.0, help="memory cap standing in for a smaller card "
                        "(0: the whole card)")
    parser.add_argument("--as-gpu", default="rtx4070", help="catalog card whose speed the plan assumes")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per measured step")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (the last one is measured)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    total = torch.cuda.get_device_properties(0).total_memory
    cap = args.cap_gib * GiB if args.cap_gib else total
    if args.cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    card = with_vram(find_gpu(args.as_gpu)[0], cap / GiB)
    settings = Settings(gpu=card, seq_len=args.seq_len)
    rows = []
    for depth in args.depths:
        config = GPTConfig.from_depth(depth, sequence_len=args.seq_len)
        for name in args.recipes:
            planned = evaluate(config, NAMED[name], settings, tokens=1)
            recipe = planned.recipe
            if recipe.matmul == "fp8" and torch.cuda.get_device_capability() < (8, 9):
                continue
            memory = predict_memory(config, recipe)
            measured = run_steps(config, recipe, args.accum, args.steps)
            row = {"depth": depth, "recipe": recipe.to_dict(), "predicted_fits": planned.fits,
                   "predicted_allocated": memory.allocated, "predicted_total": memory.total,
                   "predicted_components": memory.components(), **measured}
            if measured["outcome"] == "ran":
                row["allocated_ratio"] = measured["max_memory_allocated"] / memory.allocated
            rows.append(row)
            got = (f"{measured['max_memory_allocated'] / GiB:6.2f} GiB" if measured["outcome"] == "ran"
                   else measured["outcome"])
            print(f"d{depth} {name:<12} micro-batch {recipe.micro_batch:>2}: predicted {memory.allocated / GiB:6.2f} "
                  f"GiB allocated ({'fits' if planned.fits else 'does not fit'} {cap / GiB:.0f} GiB), measured {got}",
                  flush=True)

    stamp = datetime.now(timezone.utc)
    device = torch.cuda.get_device_name(0)
    result = {"device": device, "device_memory_bytes": total, "cap_bytes": int(cap), "date": stamp.isoformat(),
              "commit": commit(), "torch": torch.__version__, "command": " ".join(sys.argv),
              "planned_as": card.key, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"plan_memory_{stamp:%Y%m%d}_{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
