"""`onecard bench`: measure this machine's card once, remember it, and let `plan` use it.

It times a large bf16 matmul (the card's practical peak), then a few training steps of a
nanochat-class GPT with a named recipe's own model, optimizer and step function — the program
`onecard train` runs — sampling board power through NVML (the meters' reader). On CUDA the
step is compiled, as `onecard train` runs it (--no-compile for eager). What `plan` takes from it is
how fast the measured forward-backward ran against the planner's own model of it for the same
model, recipe and micro-batch on this card (the speed factor): later plans scale their modelled
utilization by it, so a calibration made at one depth and micro-batch carries to others. The MFU
of forward-backward (model FLOPs per second over the catalog's peak) and the whole step, update
included, are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from onecard.args import positive_int, text_arg
from onecard.errors import UsageError
from onecard.recipe import NAMED

# On a CPU the same program runs at a size that finishes in seconds: a check, not a calibration.
CPU_SHAPE = dict(depth=2, micro_batch=2, seq_len=128, steps=3)
CUDA_SHAPE = dict(depth=12, micro_batch=8, seq_len=2048, steps=10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", type=text_arg, help="catalog name of this card, when its reported name is not "
                                                     "recognized")
    parser.add_argument("--recipe", type=text_arg, default="baseline",
                        help=f"the recipe whose step is timed: {', '.join(NAMED)} (default baseline)")
    parser.add_argument("--depth", type=positive_int, help="model depth for the training steps (default 12; CPU 2)")
    parser.add_argument("--micro-batch", type=positive_int, help="sequences per micro-batch (default 8; CPU 2)")
    parser.add_argument("--seq-len", type=positive_int, help="sequence length (default 2048; CPU 128)")
    parser.add_argument("--steps", type=positive_int, help="training steps, the last one timed (default 10; CPU 3)")
    parser.add_argument("--size", type=positive_int, help="matmul size (default 8192 on CUDA, 1024 on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the model (default: on with CUDA, as `onecard train`; off on the CPU)")
    parser.add_argument("--no-save", action="store_true", help="measure only, do not store the calibration")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from onecard.device import unrunnable_reason
    from onecard.model_config import GPTConfig
    from onecard.plan import calibrate
    from onecard.recipe import named_recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {**(CUDA_SHAPE if device == "cuda" else CPU_SHAPE),
             **{k: getattr(args, k) for k in CPU_SHAPE if getattr(args, k) is not None}}
    config = GPTConfig.from_depth(shape["depth"], sequence_len=shape["seq_len"])
    recipe = named_recipe(args.recipe, seq_len=shape["seq_len"], micro_batch=shape["micro_batch"])
    compiled = args.compile if args.compile is not None else device == "cuda" or recipe.compile
    recipe = recipe.with_(compile=compiled)
    if args.steps is not None and args.steps < 2:
        raise UsageError("--steps must be at least 2: the first step warms up, the last is timed")
    reason = unrunnable_reason(recipe, device)
    if reason:  # before the matmul is timed, not after
        raise UsageError(f"{recipe.name} cannot run here: {reason}")
    if not args.no_save:  # before the measurement, which on a card takes minutes
        calibrate.check_writable()
    if args.gpu and device == "cpu":
        say(f"note: --gpu {args.gpu} names a CUDA card, and this PyTorch sees none: measuring the CPU instead")
    record, text = measure(device, args.gpu, config, recipe, shape["steps"], args.size)
    if not args.no_save:
        key = record.get("key", "cpu")
        text.append(f"stored under '{key}' in {calibrate.save(key, record)}"
                    + (f"; `onecard plan` on this card now scales its modelled speed by {record['speed_factor']:.2f}"
                       if "speed_factor" in record else "; `onecard plan` uses calibrations of CUDA cards only"
                       if device == "cpu" else "; `onecard plan` keeps its modelled speed (see above)"))
    print(json.dumps(record, indent=2) if args.json else "\n".join(text))
    return 0


def say(line: str) -> None:
    """A progress line, on stderr: stdout keeps the result (--json)."""
    print(line, file=sys.stderr, flush=True)


def measure(device: str, gpu_name: str | None, config, recipe, steps: int, size: int | None) -> tuple[dict, list]:
    """The record to store and the lines to print."""
    import torch

    from onecard.device import local_card
    from onecard.measure import matmul_flops, time_recipe_steps
    from onecard.meters import PowerMeter, nvml_power_reader
    from onecard.model_config import flops_per_token

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"device": device, "date": now, "torch": torch.__version__}
    gpu = None
    if device == "cuda":
        from onecard.plan.catalog import find_gpu
        name = local_card()[0]
        try:
            gpu, _ = find_gpu(gpu_name or name)
        except UsageError:
            raise UsageError(f"{name} is not in the catalog: say which card it is like with --gpu NAME") from None
        record |= {"device": name, "key": gpu.key}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = size or (8192 if device == "cuda" else 1024)
    mode = "compiled" if recipe.compile else "eager"
    shape = f"d{config.n_layer}, recipe {recipe.name} ({mode}), micro-batch {recipe.micro_batch} x {recipe.seq_len}"
    say(f"timing {size}^3 matmuls on {'the card' if device == 'cuda' else 'the CPU'} ...")
    flops = matmul_flops(device, dtype, size, repeats=10 if device == "cuda" else 3)
    say(f"timing {steps} training steps of {shape}"
        + (" (the first compiles the model: it takes a while) ..." if recipe.compile else " ..."))
    power = PowerMeter(nvml_power_reader(device)).start()
    started = time.monotonic()
    train = time_recipe_steps(config, recipe, 1, steps, device)
    power.stop()
    if train["outcome"] != "ran":
        raise UsageError(f"the training step ran out of memory ({train['error']}): give a smaller --micro-batch "
                         "or --depth, or a leaner --recipe")
    joules = power.joules()
    watts = joules / (time.monotonic() - started) if joules else None
    fb_flops = train["forward_backward_tokens_per_s"] * flops_per_token(config)
    train |= {"depth": config.n_layer, "micro_batch": recipe.micro_batch, "seq_len": recipe.seq_len,
              "steps": steps, "recipe": recipe.name, "compile": recipe.compile, "model_flops_per_s": fb_flops,
              "power_watts": watts}
    record |= {"recipe": recipe.name, "train": train, "power_watts": watts}
    step = (f"step {train['step_s']:.3f} s = forward-backward {train['forward_backward_s']:.3f} s + update "
            f"{train['update_s']:.3f} s")
    if gpu is None:
        record["matmul_flops_fp32"] = flops
        return record, [f"no CUDA GPU here: fp32 matmul {flops / 1e9:,.1f} GFLOP/s ({size}^3); training {shape}: "
                        f"{train['tokens_per_s']:,.0f} tokens/s, {step}"]
    mfu = fb_flops / gpu.peak_bf16
    record |= {"matmul_flops_bf16": flops, "matmul_efficiency": flops / gpu.peak_bf16}
    shown = f"{watts:.0f} W" if watts else "unknown (pip install nvidia-ml-py)"
    if copies_in_forward_backward(recipe):  # not what the compute model times: measured, not a calibration
        train["mfu"] = mfu
        against = (f"not a calibration: recipe {recipe.name} copies activations or gradients across PCIe inside "
                   "forward-backward; bench a recipe that keeps them on the card (--recipe lean, say)")
    else:
        factor = speed_factor(config, recipe, gpu, train["forward_backward_s"])
        record |= {"mfu": mfu, "speed_factor": factor}
        against = f"{factor:.2f}x the planner's model"
    return record, [f"{record['device']} (catalog: {gpu.name}, {gpu.peak_bf16 / 1e12:.1f} TFLOP/s bf16 peak)",
                    f"  matmul {size}^3 bf16: {flops / 1e12:.1f} TFLOP/s = {flops / gpu.peak_bf16:.0%} of peak",
                    f"  training {shape}: {train['tokens_per_s']:,.0f} tokens/s, {step}",
                    f"  MFU of forward-backward {mfu:.1%} ({against}), board power {shown}",
                    f"  peak memory allocated {train['max_memory_allocated'] / 2**30:.2f} GiB"]


def copies_in_forward_backward(recipe) -> bool:
    """Whether a micro-batch's forward-backward also moves activations (offload) or gradients (grads=cpu)
    across PCIe: time the planner counts apart from compute, so it cannot calibrate compute."""
    return recipe.activations == "offload" or recipe.grads == "cpu"


def speed_factor(config, recipe, gpu, forward_backward_s: float) -> float:
    """How much faster one micro-batch's forward-backward ran than the planner models it on this card."""
    from onecard.plan.timing import predict_time

    tokens = recipe.micro_batch * recipe.seq_len
    return predict_time(config, recipe, gpu, 1, tokens).compute_s / forward_backward_s
