"""What a training step holds on the card at its peak, by the line of code that allocated it, beside
the planner's breakdown of the same step.

The planner's eager memory model counts exactly what autograd saves (tests/test_plan_memory.py),
yet the H200's measured eager peaks sit 50-60 bytes x width per token above that count plus the
temporaries it models (docs/memory.md#activations). This finds out what the rest is: it records
every CUDA allocation and free of one step (torch.cuda.memory._record_memory_history, described in
PyTorch's "Understanding CUDA Memory Usage"), replays them to the moment of the most bytes
allocated, and sums what is alive then by the innermost onecard (or torch) source line that made it.

    python benchmarks/memory_trace.py --depth 20 --recipe lean --micro-batch 16      # eager
    python benchmarks/memory_trace.py --depth 20 --recipe lean --micro-batch 16 --compile

Writes results/memory_trace_<date>.json (device, date, torch, commit, rows) and prints a table.
Allocations made before the step (weights, gradient buffers, optimizer states) are not in the
trace; the step's own peak above them is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import HERE, commit  # noqa: E402

FREED = ("free_completed", "free")  # the block is back with the allocator (older traces say "free")


def live_at_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """Replay a trace's alloc/free events: the most bytes allocated at once (above what was
    allocated before the trace began) and the allocations alive at that moment. A free of memory
    allocated before the trace began is skipped: it was never counted."""
    live: dict[int, dict] = {}
    total = peak = peak_at = 0
    for i, event in enumerate(events):
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = event
            total += event.get("size", 0)
            if total > peak:
                peak, peak_at = total, i + 1
        elif action in FREED and addr in live:
            total -= live.pop(addr).get("size", 0)
    alive: dict[int, dict] = {}
    for event in events[:peak_at]:
        if event.get("action") == "alloc":
            alive[event.get("addr")] = event
        elif event.get("action") in FREED:
            alive.pop(event.get("addr"), None)
    return peak, list(alive.values())


def site(event: dict) -> str:
    """Where an allocation came from: the innermost frame in onecard's code, else the innermost
    Python frame of torch, else the first frame recorded."""
    frames = event.get("frames") or []
    for want in ("/onecard/", "/torch/"):
        for frame in frames:
            if want in frame.get("filename", "") and frame.get("filename", "").endswith(".py"):
                name = frame["filename"].split(want)[-1]
                return f"{want.strip('/')}/{name}:{frame.get('line')} {frame.get('name', '')}"
    if frames:
        return f"{frames[0].get('filename', '?')}:{frames[0].get('line')} {frames[0].get('name', '')}"
    return "(no frames recorded)"


def by_site(alive: list[dict]) -> list[tuple[str, int, int]]:
    """(site, bytes, allocations) alive at the peak, the largest first."""
    sizes, counts = Counter(), Counter()
    for event in alive:
        where = site(event)
        sizes[where] += event.get("size", 0)
        counts[where] += 1
    return [(where, size, counts[where]) for where, size in sizes.most_common()]


def trace_step(config, recipe, accum: int) -> dict:
    """Two steps to warm up (kernels, compile, optimizer states), then one recorded step."""
    import torch

    from onecard.family import build_model, build_optimizer
    from onecard.measure import SyntheticBatches
    from onecard.step import TrainStep

    torch.manual_seed(0)
    model = build_model(config, device="cuda")
    model.set_policies(recipe.activations, recipe.loss)
    opt = build_optimizer(model, recipe)
    step = TrainStep(model, opt, "cuda", compile_model=recipe.compile)
    batches = SyntheticBatches(config.vocab_size, recipe.micro_batch, recipe.seq_len, "cuda")
    for _ in range(2):
        step(batches, accum)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    # Python frames only: C++ ones add nothing to site() and take minutes to symbolize at _snapshot()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        step(batches, accum)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, alive = live_at_peak(events)
    return {"allocated_before_step": before, "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "trace_events": len(events), "trace_peak": peak, "sites": by_site(alive)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--recipe", default="lean")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step (default 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--top", type=int, default=25, help="sites to print")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("memory_trace.py records CUDA allocations: it needs a CUDA GPU", file=sys.stderr)
        return 2
    from onecard.model_config import GPTConfig
    from onecard.plan.memory import predict_memory
    from onecard.recipe import named_recipe

    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    recipe = named_recipe(args.recipe, micro_batch=args.micro_batch, seq_len=args.seq_len, compile=args.compile)
    measured = trace_step(config, recipe, args.accum)
    predicted = predict_memory(config, recipe, micro_steps=args.accum)
    gib = 2 ** 30
    print(f"d{args.depth} {recipe.name} micro-batch {args.micro_batch} x {args.seq_len}, {args.accum} per step, "
          f"{'compiled' if recipe.compile else 'eager'}: allocated before the step "
          f"{measured['allocated_before_step'] / gib:.2f} GiB, the step's peak "
          f"{measured['max_memory_allocated'] / gib:.2f} GiB (planner {predicted.allocated / gib:.2f} GiB)")
    print(f"alive at the traced peak, {measured['trace_peak'] / gib:.2f} GiB above the step's start:")
    for where, size, count in measured["sites"][:args.top]:
        print(f"  {size / gib:8.3f} GiB  {count:5d}  {where}")
    result = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__, "commit": commit(), "command": " ".join(sys.argv),
              "depth": args.depth, "recipe": recipe.to_dict(), "accum": args.accum, **measured,
              "predicted": {k: int(v) for k, v in predicted.components().items()},
              "predicted_allocated": int(predicted.allocated)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory_trace_{time.strftime('%Y%m%d-%H%M%S')}_d{args.depth}_{args.recipe}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
