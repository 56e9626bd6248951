"""Command-line front of the planner: `onecard plan` and `onecard bench` (wired in onecard/cli.py)."""

from __future__ import annotations

import argparse
import json
import math

from onecard.errors import UsageError
from onecard.model import parse_model_name
from onecard.plan import calibrate, report
from onecard.plan.assumptions import DEFAULT
from onecard.plan.catalog import GPU, GiB, detect_gpu, find_gpu, with_vram
from onecard.plan.search import (
    Settings,
    budget,
    candidates,
    check_batch,
    config_params,
    fastest_fit,
    nearest_fit,
    overflow,
)
from onecard.recipe import NAMED

SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def gigabytes(text: str) -> float:
    """'12', '12GB', '12 GiB', '8g' -> 12.0: card memory in GiB (what card makers call GB)."""
    t = str(text).strip().lower().replace(" ", "")
    for unit in ("gib", "gb", "g"):
        if t.endswith(unit):
            t = t[: -len(unit)]
            break
    return number(t)


def number(text: str) -> float:
    """'38e9', '38B', '1.5T', '524288' -> float (argparse turns a bad one into a one-line error)."""
    t = str(text).strip().lower().replace(",", "").replace("_", "")
    scale = SUFFIX.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", help="model as dN, e.g. d32 (nanochat's depth dial)")
    what.add_argument("--depth", type=int, help="model depth N (same as --model dN)")
    parser.add_argument("--gpu", help="card name, e.g. rtx4070, '4090', h100 (default: this machine's card)")
    parser.add_argument("--vram", type=gigabytes, help="override the card's memory, e.g. 12GB (GiB)")
    parser.add_argument("--gpus", type=int, default=1, help="N identical cards, data-parallel (default 1)")
    budget_group = parser.add_mutually_exclusive_group()
    budget_group.add_argument("--tokens", type=number, help="training tokens, e.g. 38e9 or 38B")
    budget_group.add_argument("--ratio", type=number, help="tokens per parameter (default 20, Chinchilla)")
    parser.add_argument("--days", type=number, help="time budget: with a model, how many tokens fit; "
                                                   "without, the best model that trains in that time")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--total-batch", type=number, default=524288, help="tokens per optimizer step (524288)")
    parser.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: largest that fits)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size (default 65536)")
    parser.add_argument("--mfu", type=number, help="assumed utilization of the bf16 peak, 0-1 "
                                                  "(default: calibration, else by card kind)")
    parser.add_argument("--power", type=number, help="average board power in W (default: the card's rating)")
    parser.add_argument("--price", type=number, default=0.15, help="electricity price per kWh (default 0.15)")
    parser.add_argument("--currency", default="USD", help="currency of --price (default USD)")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--recipe", help=f"plan one recipe: {', '.join(NAMED)} (baseline = nanochat's way)")
    pick.add_argument("--fit", action="store_true", help="the fastest recipe that fits (the default)")
    parser.add_argument("--assume", action="append", metavar="NAME=VALUE",
                        help="override a planner assumption (see onecard/plan/assumptions.py); repeatable")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--plot", metavar="FILE.png", help="draw memory by component and time per recipe")


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{name} must be {'zero or more' if allow_zero else 'positive'}, got {value:g}")


def choose_gpu(args) -> tuple[GPU, list[str]]:
    notes = []
    if args.gpu:
        gpu, note = find_gpu(args.gpu)
        notes.append(note)
    else:
        detected = detect_gpu()
        if detected is None:
            known = ", ".join(g for g in sorted({k for k in _catalog_keys()}))
            raise UsageError(f"no CUDA GPU on this machine: name one with --gpu (known: {known})")
        gpu, note = detected
        notes.append(note)
    if args.vram is not None:
        gpu = with_vram(gpu, args.vram)
    return gpu, notes


def _catalog_keys() -> list[str]:
    from onecard.plan.catalog import CATALOG

    return list(CATALOG)


def settings_from(args) -> tuple[Settings, list[str]]:
    for name in ("tokens", "days", "ratio", "vram", "power", "mfu", "total_batch"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--price", args.price, allow_zero=True)
    for name in ("gpus", "seq_len", "micro_batch", "vocab_size", "depth"):
        _positive("--" + name.replace("_", "-"), getattr(args, name, None))
    if args.mfu is not None and args.mfu > 1:
        raise UsageError(f"--mfu is a fraction of the peak between 0 and 1, got {args.mfu:g}")
    gpu, notes = choose_gpu(args)
    s = build_settings(gpu, notes, gpus=args.gpus, seq_len=args.seq_len, total_batch=int(args.total_batch),
                       micro_batch=args.micro_batch, vocab_size=args.vocab_size, mfu=args.mfu, power=args.power,
                       price=args.price, currency=args.currency, assume=DEFAULT.with_overrides(args.assume))
    return s, notes


def build_settings(gpu: GPU, notes: list[str], *, gpus: int = 1, seq_len: int, total_batch: int,
                   micro_batch: int | None, vocab_size: int, mfu: float | None = None, power: float | None = None,
                   price: float = 0.15, currency: str = "USD", assume=DEFAULT) -> Settings:
    """Planner settings for a card, using its `onecard bench` calibration unless --mfu/--power say
    otherwise (appends what it used to `notes`)."""
    floor = assume.cuda_context_bytes + assume.workspace_bytes
    if gpu.vram_bytes <= floor:
        raise UsageError(f"--vram {gpu.vram_gib:g} GiB is below what the CUDA context and workspace take "
                         f"({floor / GiB:.2f} GiB): nothing can train there")
    utilization, source = mfu, "given with --mfu" if mfu is not None else ""
    cal = calibrate.load(gpu.key)
    if cal and mfu is None and cal.get("mfu"):
        utilization = cal["mfu"]
        train = cal.get("train", {})
        source = (f"measured by `onecard bench` on {cal.get('date', '?')[:10]} (d{train.get('depth', '?')}, "
                  f"micro-batch {train.get('micro_batch', '?')})")
        notes.append(f"using calibration from {calibrate.calibration_path()}: MFU {utilization:.1%}")
    if cal and power is None and cal.get("power_watts"):
        power = cal["power_watts"]
        notes.append(f"board power {power:.0f} W as measured by `onecard bench`")
    s = Settings(gpu=gpu, gpus=gpus, seq_len=seq_len, total_batch=total_batch, micro_batch=micro_batch,
                 vocab_size=vocab_size, utilization=utilization, utilization_source=source, power_watts=power,
                 price=price, currency=currency, assume=assume)
    check_batch(s)
    return s


def run_plan(args) -> int:
    s, notes = settings_from(args)
    if args.recipe and args.recipe.strip().lower() not in NAMED:
        raise UsageError(f"unknown recipe {args.recipe!r}: known recipes are {', '.join(NAMED)}")
    if args.days is not None and args.tokens is not None:
        raise UsageError("give --tokens or --days, not both: --days decides how many tokens fit")
    ratio = args.ratio if args.ratio is not None else 20.0
    depth = args.depth if args.depth is not None else (parse_model_name(args.model) if args.model else None)

    if depth is None:
        if args.days is None:
            raise UsageError("say which model (--model dN or --depth N), or give --days D to find the best "
                             "model for a time budget")
        found = budget(s, args.days, ratio)
        if args.json:
            print(json.dumps(report.budget_json(s, args.days, ratio, found, notes), indent=2))
        else:
            print(report.budget_text(s, args.days, ratio, found, notes))
        if args.plot and found:
            config, best = found[0]
            cands = candidates(config, s, best.tokens)
            report.plot(cands, s, args.plot, f"d{config.n_layer} on {s.gpu.name}, {best.tokens:,} tokens")
        return 0

    try:
        config = s.config(depth)
    except UsageError as error:
        raise UsageError(f"d{depth} has no valid shape: {error}") from None
    names = [args.recipe.strip().lower()] if args.recipe else None
    if args.days is not None:
        tokens, seconds = None, args.days * 86400
        cands = candidates(config, s, seconds=seconds, names=names)
    else:
        tokens = int(args.tokens) if args.tokens is not None else int(ratio * config_params(config))
        cands = candidates(config, s, tokens, names=names)
    best = fastest_fit(cands)
    why, nearest = "", None
    if best is None:
        why = overflow(cands, s.gpu.vram_bytes)
        given = int(args.tokens) if args.tokens is not None else None
        nearest = nearest_fit(depth, s, ratio, given, args.days * 86400 if args.days else None,
                              tried_all=names is None)
    shown_tokens = best.tokens if best else cands[0].tokens
    if args.days is not None:
        line = (f"as many as fit in {args.days:g} days: {shown_tokens:,} with the best recipe "
                f"({shown_tokens / config_params(config):.1f} tokens/param)")
    elif args.tokens is not None:
        line = f"{tokens:,} ({tokens / config_params(config):.1f} tokens/param)"
    else:
        line = f"{tokens:,} ({ratio:g} tokens/param)"
    line += (f" = {shown_tokens / s.total_batch:,.0f} steps of {s.total_batch:,} tokens, sequence {s.seq_len}"
             + (f", {s.gpus} GPUs" if s.gpus > 1 else ""))
    if args.json:
        print(json.dumps(report.plan_json(config, s, cands, best, shown_tokens, notes, why, nearest), indent=2))
    else:
        print(report.plan_text(config, s, cands, best, line, notes, why, nearest))
    if args.plot:
        report.plot(cands, s, args.plot, f"d{depth} on {s.gpu.name}, {shown_tokens:,} tokens")
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", help="catalog name of this card, when its reported name is not recognized")
    parser.add_argument("--depth", type=int, default=12, help="model depth for the training steps (default 12)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--size", type=int, help="matmul size (default 8192 on CUDA, 1024 on the CPU)")
    parser.add_argument("--no-save", action="store_true", help="measure only, do not store the calibration")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")


def run_bench(args) -> int:
    for name in ("depth", "micro_batch", "seq_len", "steps", "size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    record, text = calibrate.bench(args.gpu, args.depth, args.micro_batch, args.seq_len, args.steps,
                                   args.size, store=not args.no_save)
    print(json.dumps(record, indent=2) if args.json else text)
    return 0
