"""The CPU side of grads=cpu: adding one micro-batch's bf16 gradients into the fp32 buffers in host
memory, as onecard's folding thread does, written two ways and timed side by side.

- `mixed add_`: target.add_(source) with a bf16 source and an fp32 target (what onecard did before);
- `widened`: onecard.grad_fold.fold_into, which widens the source to fp32 a chunk at a time
  (grad_fold.FOLD_CHUNK elements) and then adds fp32 to fp32. Both give the same bits (checked
  here on every parameter of the first round).

The buffers are the model's own (every parameter of `--depth`, fp32, flattened); the source is one bf16
tensor the size of a CUDA staging buffer (grad_fold.STAGING_BYTES), as the worker receives gradients
in staging-buffer pieces. Rounds alternate which way goes first; the result is nanoseconds per
parameter (the median over rounds) and the paired ratio. Each thread count and chunk size is its own
row. Results go to benchmarks/results/grad_fold_cpu_<date>.json.

    python benchmarks/grad_fold_cpu.py                          # d20, this machine's thread counts
    python benchmarks/grad_fold_cpu.py --depth 32 --threads 1 2 --chunks 262144 1048576 4194304
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import commit, cpu_name  # noqa: E402

from onecard import grad_fold
from onecard.model_config import GPTConfig
from onecard.plan.persistent import parameter_shapes

HERE = Path(__file__).resolve().parent


def buffers(depth: int) -> list[torch.Tensor]:
    config = GPTConfig.from_depth(depth)
    return [torch.zeros(rows * cols) for shapes in parameter_shapes(config).values() for rows, cols in shapes]


def pieces(buffer: torch.Tensor, piece: int):
    for lo in range(0, buffer.numel(), piece):
        yield buffer[lo:lo + piece]


def fold_all(targets: list[torch.Tensor], source: torch.Tensor, widened: bool) -> float:
    """Seconds to add `source` (cut to size) into every piece of every target."""
    began = time.perf_counter()
    for target in targets:
        for part in pieces(target, source.numel()):
            if widened:
                grad_fold.fold_into(part, source[:part.numel()], first=False)
            else:
                part.add_(source[:part.numel()])
    return time.perf_counter() - began


def check_same_bits(targets: list[torch.Tensor], source: torch.Tensor) -> bool:
    for target in targets:
        for part in pieces(target, source.numel()):
            start = torch.randn(part.numel())
            mixed, widened = start.clone(), start.clone()
            mixed.add_(source[:part.numel()])
            grad_fold.fold_into(widened, source[:part.numel()], first=False)
            if not torch.equal(mixed, widened):
                return False
    return True


def measure(targets: list[torch.Tensor], source: torch.Tensor, rounds: int) -> dict:
    params = sum(t.numel() for t in targets)
    times: dict[str, list[float]] = {"mixed": [], "widened": []}
    for r in range(rounds + 1):  # round 0 warms up (first touch of every page) and is not kept
        order = ["mixed", "widened"] if r % 2 else ["widened", "mixed"]
        took = {way: fold_all(targets, source, way == "widened") for way in order}
        if r:
            for way in order:
                times[way].append(took[way])
    paired = [m / w for m, w in zip(times["mixed"], times["widened"], strict=True)]
    return {"mixed_ns_per_param": statistics.median(times["mixed"]) / params * 1e9,
            "widened_ns_per_param": statistics.median(times["widened"]) / params * 1e9,
            "speedup_paired_median": statistics.median(paired), "speedup_paired_min": min(paired),
            "speedup_paired_max": max(paired)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--chunks", type=int, nargs="+", default=[grad_fold.FOLD_CHUNK],
                        help="grad_fold.FOLD_CHUNK values to try (elements widened at a time)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    targets = buffers(args.depth)
    source = torch.randn(grad_fold.STAGING_BYTES // 2).bfloat16()
    params = sum(t.numel() for t in targets)
    same = check_same_bits(targets, source)
    print(f"d{args.depth}: {params:,} parameters in {len(targets)} fp32 buffers; same bits both ways: {same}")
    result = {"command": " ".join(["benchmarks/grad_fold_cpu.py", *sys.argv[1:]]), "cpu": cpu_name(),
              "cpus": os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(), "commit": commit(),
              "torch": torch.__version__, "depth": args.depth, "parameters": params, "same_bits": same, "rows": []}
    print("| threads | chunk | mixed add_ ns/param | widened ns/param | speed-up (paired median, min-max) |")
    print("| --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for chunk in args.chunks:
            grad_fold.FOLD_CHUNK = chunk
            row = {"threads": threads, "chunk": chunk, **measure(targets, source, args.rounds)}
            result["rows"].append(row)
            spread = f"{row['speedup_paired_min']:.2f}-{row['speedup_paired_max']:.2f}"
            print(f"| {threads} | {chunk:,} | {row['mixed_ns_per_param']:.3f} | {row['widened_ns_per_param']:.3f} | "
                  f"{row['speedup_paired_median']:.2f}x ({spread}) |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"grad_fold_cpu_{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
