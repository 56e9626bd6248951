"""onecard against nanochat's own code: the same model, weights, batch and precision, side by side
in one process, as ratios.

nanochat runs from a reference copy of its code (karpathy/nanochat at commit fae3aca; --reference,
default ../shared/reference/nanochat-fae3aca beside the checkout): its GPT, its init, its Muon and
fused AdamW (`setup_optimizers`), bf16 autocast on CUDA and `torch.compile(model, dynamic=False)`
there, as its base_train.py does. onecard runs its recipes through its own step (onecard.step).
Full optimizer steps (forward, backward, update) take turns between the implementations so that
whatever else the machine does falls on all alike; the median step time of each gives tokens/s.
Each implementation's peak memory is then measured alone: on CUDA the allocator's peak of the
whole process, on the CPU the most bytes a step holds above what it started with (PyTorch's
profiler reports every CPU allocation with the running total), since the CPU keeps no peak.

    python benchmarks/vs_nanochat.py --device cpu                       # tiny config, minutes
    python benchmarks/vs_nanochat.py --device cpu --compile             # both compiled by inductor
    python benchmarks/vs_nanochat.py --device cuda --depth 20 --micro-batch 32
    python benchmarks/vs_nanochat.py --device cuda --depth 32 --micro-batch 8 --recipes baseline,lean

On the CPU both run eagerly by default, with nanochat's `@torch.compile` on its Newton-Schulz
switched off (TORCHDYNAMO_DISABLE): compiling takes minutes there and measures the compiler, not
the step. `--compile` compiles both models as on CUDA (inductor's C++ code for the CPU), which
shows what the compiler keeps for backward. nanochat's embedding is kept in fp32 as onecard's is
there (nanochat casts it to bf16 for CUDA's autocast; without autocast the CPU cannot mix the two).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import commit  # noqa: E402  benchmarks/common.py

DEFAULT_REFERENCE = HERE.parents[1] / "shared" / "reference" / "nanochat-fae3aca"


def load_nanochat(reference: Path):
    if not (reference / "nanochat" / "gpt.py").exists():
        sys.exit(f"nanochat's code not found at {reference}: give --reference PATH (a checkout of "
                 "karpathy/nanochat at commit fae3aca)")
    sys.path.insert(0, str(reference))
    return importlib.import_module("nanochat.gpt")


def sync(device: str) -> float:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class NanochatStep:
    """One full step of nanochat's own training code on a fixed batch."""

    def __init__(self, gpt, config, device: str, compile_model: bool) -> None:
        import torch
        with torch.device("meta"):
            self.model = gpt.GPT(gpt.GPTConfig(**config))
        self.model.to_empty(device=device)
        self.model.init_weights()
        if device == "cpu":  # nanochat keeps wte in bf16 for CUDA's autocast; the CPU runs fp32, as onecard's does
            self.model.transformer.wte.to(dtype=torch.float32)
        self.step_model = torch.compile(self.model, dynamic=False) if compile_model else self.model
        self.optimizers = self.model.setup_optimizers()
        self.device = device

    def __call__(self, inputs, targets) -> float:
        import torch
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" else nullcontext()
        with autocast:
            loss = self.step_model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # base_train.py's grad_clip, as onecard's
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return float(loss.detach())


class OnecardStep:
    """One full step of an onecard recipe, through onecard's own TrainStep, from nanochat's weights."""

    def __init__(self, recipe_name: str, state: dict, config: dict, device: str, micro_batch: int, seq_len: int,
                 compile_model: bool) -> None:
        from onecard.model import GPTConfig, build_model
        from onecard.optim import build_optimizer
        from onecard.recipe import named_recipe
        from onecard.step import TrainStep

        recipe = named_recipe(recipe_name, micro_batch=micro_batch, seq_len=seq_len, compile=compile_model)
        self.model = build_model(GPTConfig(**config), device=device, init=False)
        self.model.load_state_dict({k: v.float() for k, v in state.items()})
        self.model.set_policies(recipe.activations, recipe.loss)
        self.step = TrainStep(self.model, build_optimizer(self.model, recipe), device, compile_model=recipe.compile,
                              on_compile_failed=_refuse_eager)
        self.name = recipe.name

    def __call__(self, inputs, targets) -> float:
        batch = _Fixed(inputs, targets)
        return self.step(batch, 1).loss


def _refuse_eager(message: str) -> None:
    """onecard's trainer falls back to eager when a compile fails; here that would pass eager numbers
    off as compiled ones beside nanochat's compiled model."""
    raise RuntimeError(f"onecard's compile failed ({message}): no compiled measurement to compare")


class _Fixed:
    def __init__(self, inputs, targets) -> None:
        self.batch = (inputs, targets)

    def next_batch(self):
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def timed_rounds(steps: dict, inputs, targets, device: str, rounds: int, warmup: int,
                 first: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Step times after `warmup` rounds; `first` gets each one's first step (compiling included)."""
    first = {} if first is None else first
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    for round_ in range(warmup + rounds):
        # interleaved, the order rotating by one each round: the machine's other work and any cost
        # of going first or last fall on every one alike, and none runs twice in a row on warm
        # caches more often than another (alternating the order would favour the two at the ends)
        shift = round_ % len(order)
        for name, step in order[shift:] + order[:shift]:
            start = sync(device)
            step(inputs, targets)
            if round_ >= warmup:
                times[name].append(sync(device) - start)
            elif round_ == 0:  # the first step compiles: said at once, so a run cut short still shows it
                first[name] = sync(device) - start
                print(f"{name:<22} first step {first[name]:,.1f} s (compiling included)", flush=True)
    return times


def peak_memory(make, inputs, targets, device: str) -> int:
    """Peak allocated bytes of one implementation alone: built, two steps, freed. On the CPU: the
    second step's peak above what was allocated when it began (weights and optimizer states)."""
    import torch
    if device == "cpu":
        return _cpu_step_peak(make(), inputs, targets)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = make()
    for _ in range(2):
        step(inputs, targets)
    peak = torch.cuda.max_memory_allocated()
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _cpu_step_peak(step, inputs, targets) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    step(inputs, targets)  # the first step makes the optimizer's states
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(inputs, targets)

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()  # every allocation, in order
    allocations = sorted((e for e in walk(tree) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    if not allocations:
        return 0
    first = allocations[0].extra_fields
    before = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated for e in allocations) - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--depth", type=int, help="default 2 on the CPU, 20 on CUDA")
    parser.add_argument("--micro-batch", type=int, help="default 4 on the CPU, 32 on CUDA")
    parser.add_argument("--seq-len", type=int, help="default 128 on the CPU, 2048 on CUDA")
    parser.add_argument("--vocab-size", type=int, help="default 2048 on the CPU, 65536 on CUDA")
    parser.add_argument("--recipes", default="baseline", help="onecard recipes, comma-separated")
    parser.add_argument("--compile", action="store_true", help="on the CPU, compile both (CUDA always does)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    compiled = cuda or args.compile
    if not compiled:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported: nanochat's @torch.compile runs eagerly
    import torch

    from onecard.model_config import GPTConfig, flops_per_token

    depth, micro = args.depth or (20 if cuda else 2), args.micro_batch or (32 if cuda else 4)
    seq_len, vocab = args.seq_len or (2048 if cuda else 128), args.vocab_size or (65536 if cuda else 2048)
    shape = GPTConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq_len).to_dict()
    gpt = load_nanochat(args.reference)
    torch.manual_seed(0)
    nanochat = NanochatStep(gpt, shape, args.device, compile_model=compiled)
    # kept on the host: on the card it would sit in every peak below and pull the ratios towards 1
    state = {k: v.detach().cpu().clone() for k, v in nanochat.model.state_dict().items()}
    steps = {"nanochat": nanochat}
    for name in args.recipes.split(","):
        steps[f"onecard {name}"] = OnecardStep(name, state, shape, args.device, micro, seq_len, compile_model=compiled)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (micro, seq_len + 1), generator=generator).to(args.device)
    inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    first: dict[str, float] = {}
    times = timed_rounds(steps, inputs, targets, args.device, args.rounds, args.warmup, first)
    rows = speed_rows(times, micro * seq_len)
    for name, seconds in first.items():
        rows[name]["first_step_s"] = seconds
    header = {"command": " ".join(["python", "benchmarks/vs_nanochat.py", *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
              "machine": _machine(args.device), "torch": torch.__version__, "compiled": compiled,
              "peak_memory": "allocator peak" if cuda else "peak above the step's start",
              "shape": shape, "micro_batch": micro,
              "model_flops_per_token": flops_per_token(GPTConfig(**shape)), "reference": "karpathy/nanochat fae3aca"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vs_nanochat_{args.device}_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:  # after every measurement: a run cut short by a time limit keeps what it measured
        path.write_text(json.dumps(header | {"rows": rows}, indent=2) + "\n")

    save()
    for name, row in rows.items():
        low, mid, high = row["paired_ratio_quartiles"]
        print(f"{name:<22} {row['tokens_per_s']:>10,.0f} tokens/s ({row['vs_nanochat_tokens_per_s']:.2f}x; paired by "
              f"round {mid:.2f}x, quartiles {low:.2f}-{high:.2f})", flush=True)

    del steps, nanochat
    makers = {"nanochat": lambda: NanochatStep(gpt, shape, args.device, compiled)}
    for name in args.recipes.split(","):
        makers[f"onecard {name}"] = (lambda n=name: OnecardStep(n, state, shape, args.device, micro, seq_len, compiled))
    for name, make in makers.items():
        row = rows[name]
        row["peak_allocated_bytes"] = peak_memory(make, inputs, targets, args.device)
        row["vs_nanochat_memory"] = row["peak_allocated_bytes"] / rows["nanochat"]["peak_allocated_bytes"]
        memory = f"{name:<22} peak {row['peak_allocated_bytes'] / 2**20:,.2f} MiB"
        memory += "" if cuda else " above the step's start"
        memory += f" ({row['vs_nanochat_memory']:.4f}x)"
        if cuda:  # the planner's peak beside it: one micro-batch per step, as measured (nanochat's is baseline's)
            recipe = "baseline" if name == "nanochat" else name.removeprefix("onecard ")
            row["predicted_allocated_bytes"] = predicted_peak(shape, recipe, micro, seq_len)
            memory += f", planner {row['predicted_allocated_bytes'] / 2**20:,.2f} MiB"
        save()
        print(memory, flush=True)
    print(f"written: {path}")
    return 0


def speed_rows(times: dict[str, list[float]], tokens: int) -> dict[str, dict]:
    """tokens/s of each implementation's median step, against nanochat's: as a ratio of medians and
    paired by round (nanochat's step time over this one's in the same round, a ratio the machine's
    slow drifts cannot tilt; its quartiles show the spread)."""
    rows = {name: {"median_step_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t),
                   "steps_timed": len(t)} for name, t in times.items()}
    for name, row in rows.items():
        row["vs_nanochat_tokens_per_s"] = row["tokens_per_s"] / rows["nanochat"]["tokens_per_s"]
        paired = sorted(a / b for a, b in zip(times["nanochat"], times[name], strict=True))
        row["paired_ratio_quartiles"] = [paired[len(paired) // 4], statistics.median(paired),
                                         paired[(3 * len(paired)) // 4]]
    return rows


def predicted_peak(shape: dict, recipe_name: str, micro_batch: int, seq_len: int) -> int:
    """What onecard's planner says torch.cuda.max_memory_allocated reads for this compiled step."""
    from onecard.model_config import GPTConfig
    from onecard.plan.memory import predict_memory
    from onecard.recipe import named_recipe

    recipe = named_recipe(recipe_name, micro_batch=micro_batch, seq_len=seq_len, compile=True)
    return predict_memory(GPTConfig(**shape), recipe, micro_steps=1).allocated


def _machine(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
