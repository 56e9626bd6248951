"""`onecard plan` and `onecard info`: the planner's arithmetic on the command line.

Flags become plain values here; onecard/plan/ does the arithmetic and the words.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from onecard import defaults
from onecard.args import fraction, gigabytes, non_negative_float, positive_float, positive_int, text_arg
from onecard.datasources import plan_shards, shard_set_for
from onecard.errors import UsageError
from onecard.model_config import ARCH_2026, ARCHS, VOCAB_2026, GPTConfig, depth_from, flops_per_token, param_counts
from onecard.recipe import NAMED
from onecard.schedule_2026 import RATIO as RATIO_2026
from onecard.units import quantity

# ---------------------------------------------------------------- info

def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=text_arg, help="dN, e.g. d20 or d32 (nanochat's depth dial)")
    p.add_argument("--depth", type=positive_int, help="depth N instead of --model dN")
    p.add_argument("--arch", choices=ARCHS, default="classic", help="model family (default classic)")
    p.add_argument("--vocab-size", type=positive_int,
                   help=f"vocabulary size (default {defaults.VOCAB_SIZE}; nanochat-2026: {VOCAB_2026})")
    p.add_argument("--seq-len", type=positive_int, default=defaults.SEQ_LEN,
                   help=f"context length (default {defaults.SEQ_LEN})")
    p.add_argument("--ratio", type=positive_float,
                   help=f"training tokens per parameter (default {defaults.RATIO}, Chinchilla; nanochat-2026: "
                        f"{RATIO_2026} per matrix and lm_head parameter, as nanochat)")


def run_info(args: argparse.Namespace) -> int:
    from onecard.plan.search import horizon

    depth = depth_from(args.model, args.depth)
    if depth is None:
        raise UsageError("onecard info needs --model dN or --depth N")
    vocab = args.vocab_size or (VOCAB_2026 if args.arch == ARCH_2026 else defaults.VOCAB_SIZE)
    config = GPTConfig.from_depth(depth, vocab_size=vocab, sequence_len=args.seq_len, arch=args.arch)
    counts = param_counts(config)
    total = sum(counts.values())
    fpt = flops_per_token(config)
    _, counted, family_ratio = horizon(config)  # nanochat-2026 counts its matrices and lm_head alone
    ratio = args.ratio or family_ratio
    tokens = ratio * counted
    family = "" if config.arch == "classic" else f" ({config.arch})"
    print(f"model d{config.n_layer}{family}: n_layer {config.n_layer}, n_embd {config.n_embd}, n_head {config.n_head}, "
          f"n_kv_head {config.n_kv_head}, head_dim {config.head_dim}, vocab {config.vocab_size:,}, "
          f"context {config.sequence_len}")
    print(f"parameters: {total:,}")
    for name, count in counts.items():
        print(f"  {name:<12} {count:>15,}  ({count / total:6.1%})")
    print(f"FLOPs per token (training, 6·N_non-embedding + 12·L·H·Q·T): {fpt:,} = {fpt:.5e}")
    per = "parameter" if config.arch == "classic" else f"matrix and lm_head parameter, {counted:,} of them"
    print(f"training tokens ({ratio:g} per {per}): {tokens:,.0f} = {tokens:.4e}")
    print(f"total training FLOPs: {fpt * tokens:.4e}")
    return 0


# ---------------------------------------------------------------- plan

def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", type=text_arg, help="model as dN, e.g. d32 (nanochat's depth dial)")
    what.add_argument("--depth", type=positive_int, help="model depth N (same as --model dN)")
    parser.add_argument("--gpu", type=text_arg,
                        help="card name, e.g. rtx4070, '4090', h100 (default: this machine's card)")
    parser.add_argument("--vram", type=gigabytes, help="override the card's memory, e.g. 12GB (GiB)")
    parser.add_argument("--gpus", type=positive_int, default=1, help="N identical cards, data-parallel (default 1)")
    budget_group = parser.add_mutually_exclusive_group()
    budget_group.add_argument("--tokens", type=positive_float, help="training tokens, e.g. 38e9 or 38B")
    budget_group.add_argument("--ratio", type=positive_float,
                              help=f"tokens per parameter (default {defaults.RATIO}, Chinchilla; nanochat-2026: "
                                   f"{RATIO_2026} per matrix and lm_head parameter, as nanochat)")
    parser.add_argument("--days", type=positive_float, help="time budget: with a model, how many tokens fit; "
                                                            "without, the best model that trains in that time")
    parser.add_argument("--seq-len", type=positive_int, default=defaults.SEQ_LEN,
                        help=f"sequence length (default {defaults.SEQ_LEN})")
    parser.add_argument("--total-batch", type=positive_int,
                        help=f"tokens per optimizer step (default {defaults.TOTAL_BATCH}; nanochat-2026: its own, "
                             "growing with depth)")
    parser.add_argument("--micro-batch", type=positive_int,
                        help="sequences per micro-batch (default: largest that fits)")
    parser.add_argument("--vocab-size", type=positive_int,
                        help=f"vocabulary size (default {defaults.VOCAB_SIZE}; nanochat-2026: {VOCAB_2026})")
    parser.add_argument("--mfu", type=fraction, help="assumed utilization of the bf16 peak, 0-1 (default: "
                                                    "modelled from the model's width and the card, scaled by "
                                                    "`onecard bench` where it has run; docs/time.md)")
    parser.add_argument("--power", type=positive_float, help="average board power in W (default: the card's rating)")
    parser.add_argument("--price", type=non_negative_float, default=defaults.PRICE,
                        help=f"electricity price per kWh (default {defaults.PRICE})")
    parser.add_argument("--currency", type=text_arg, default=defaults.CURRENCY,
                        help=f"currency of --price (default {defaults.CURRENCY})")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--recipe", type=text_arg, help=f"plan one recipe: {', '.join(NAMED)} "
                                                      "(baseline = nanochat's way)")
    pick.add_argument("--fit", action="store_true", help="the fastest recipe that fits (the default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="plan compiled training, as `onecard train` runs on CUDA (default); "
                             "--no-compile plans eager mode")
    parser.add_argument("--assume", action="append", metavar="NAME=VALUE",
                        help="override a planner assumption (see onecard/plan/assumptions.py); repeatable")
    parser.add_argument("--target", choices=("gpt2",), help="gpt2: the fastest way this card trains a model "
                        "that beats GPT-2's CORE, from nanochat's published runs (nanochat-2026 family)")
    parser.add_argument("--arch", choices=ARCHS, help="model family (default classic)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--plot", metavar="FILE.png", type=text_arg,
                        help="draw memory by component and time per recipe")


def run_plan(args: argparse.Namespace) -> int:
    from onecard.device import local_card
    from onecard.plan import report
    from onecard.plan.assumptions import DEFAULT
    from onecard.plan.choose import build_settings, choose_gpu
    from onecard.plan.search import card_cannot_run

    if args.recipe and args.recipe.strip().lower() not in NAMED:
        raise UsageError(f"unknown recipe {args.recipe!r}: known recipes are {', '.join(NAMED)}")
    args.recipe = args.recipe.strip().lower() if args.recipe else None
    if args.days is not None and args.tokens is not None:
        raise UsageError("give --tokens or --days, not both: --days decides how many tokens fit")
    if getattr(args, "target", None) == "gpt2" and args.arch == "classic":  # it would plan the other family
        raise UsageError(f"--target gpt2 replays nanochat's published {ARCH_2026} runs: drop --arch classic")
    args.arch = args.arch or "classic"
    depth = depth_from(args.model, args.depth)
    if depth is not None and args.days is not None and args.ratio is not None:
        raise UsageError("give --ratio or --days with a model, not both: --days decides how many tokens fit "
                         "(without --model, --ratio sets the tokens of each model --days considers)")
    assume = DEFAULT.with_overrides(args.assume)
    gpu, notes = choose_gpu(args.gpu, args.vram, None if args.gpu else local_card())
    family = args.arch == ARCH_2026  # its own vocabulary, batch and ratio, as `onecard train` takes them
    vocab = args.vocab_size or (VOCAB_2026 if family else defaults.VOCAB_SIZE)
    s = build_settings(gpu, notes, gpus=args.gpus, seq_len=args.seq_len,
                       total_batch=args.total_batch or defaults.TOTAL_BATCH,
                       micro_batch=args.micro_batch, vocab_size=vocab, mfu=args.mfu, power=args.power,
                       price=args.price, currency=args.currency, assume=assume, compile=args.compile)
    if args.arch != "classic":
        from dataclasses import replace
        s = replace(s, arch=args.arch, family_batch=args.total_batch is None)
    if args.plot:
        report.check_plot_path(args.plot)
    # a search for the best model or run would only report that none fits (a named model's plan says why)
    why_not = card_cannot_run(NAMED[args.recipe], s.gpu) if depth is None and args.recipe else ""
    if why_not:
        raise UsageError(f"{args.recipe} cannot run on {s.gpu.name}: {why_not}; plan another --recipe")
    if getattr(args, "target", None) == "gpt2":
        return _plan_gpt2(args, s, notes, depth)
    ratio = args.ratio  # None: the family's
    if depth is None:
        return _plan_budget(args, s, notes, ratio)
    return _plan_model(args, s, notes, depth, ratio)


def _plan_gpt2(args: argparse.Namespace, s, notes: list[str], depth: int | None) -> int:
    from onecard.plan import gpt2, report

    if depth is not None or args.days is not None or args.tokens is not None or args.ratio is not None:
        raise UsageError("--target gpt2 picks the model and the tokens itself: drop --model/--depth, --days, "
                         "--tokens and --ratio")
    # the published runs' own shape: a --seq-len, --vocab-size or --total-batch would be left out of
    # the plan yet put into its "Run it" line, which would then train something else
    if args.seq_len != 2048 or args.vocab_size not in (None, VOCAB_2026) or args.total_batch is not None:
        raise UsageError(f"--target gpt2 replays nanochat's published runs at their own sequence (2048), "
                         f"vocabulary ({VOCAB_2026:,}) and batch: drop --seq-len, --vocab-size and --total-batch")
    opts = gpt2.options(s, _recipe_names(args))
    best = gpt2.fastest(opts)

    def command(o) -> str:
        return train_command(args, o.settings, o.run.depth, o.best, o.tokens, shard_set_for(o.config.arch).name,
                             total_batch=o.settings.total_batch) if o.best else ""
    def done() -> int:  # after the plan is printed: the picture of the pick's recipes
        _plot(args, best.candidates if best else [], best.settings if best else s,
              f"d{best.run.depth} (nanochat-2026) on {s.gpu.name}, {best.tokens:,} tokens" if best else "")
        return 0
    if args.json:
        print(json.dumps({"target": "gpt2", "core_source": "nanochat's published results, not measured by onecard",
                          "runs": [{"depth": o.run.depth, "ratio": o.run.ratio, "core": o.run.core,
                                    "commit": o.run.commit, "tokens": o.tokens, "total_batch": o.settings.total_batch,
                                    "best": report.candidate_json(o.best, o.settings) if o.best else None,
                                    "command": command(o) or None}
                                   for o in opts]}, indent=2))
        return done()
    where = f"these {s.gpus} cards" if s.gpus > 1 else "this card"
    lines = gpt2.summary_lines(opts, where)
    if best is None:
        lines.append(f"\nNone of these fits {where}.")
        print("\n".join(lines))
        return done()
    o = best
    lines += ["", f"Fastest to GPT-2 on {where}: d{o.run.depth} at ratio {o.run.ratio:g} "
                  f"(nanochat-2026), recipe {o.best.recipe.name}", ""]
    tokens_line = (f"{o.tokens:,} ({o.run.ratio:g} per scaling parameter: matrices + lm_head) = "
                   f"{o.tokens / o.settings.total_batch:,.0f} steps of {o.settings.total_batch:,} tokens, "
                   "sequence 2048")
    data = plan_shards(o.tokens, shard_set_for(o.config.arch))
    data_line = f"{data.line()}; `onecard data download {data.shard_set.name} --shards {data.train_shards}`"
    lines.append(report.plan_text(o.config, o.settings, o.candidates, o.best, tokens_line, notes, data_line=data_line,
                                  command=command(o)))
    print("\n".join(lines))
    return done()


def _plan_budget(args: argparse.Namespace, s, notes: list[str], ratio: float | None) -> int:
    from onecard.plan import report
    from onecard.plan.search import budget, candidates, for_model

    if args.days is None:
        raise UsageError("say which model (--model dN or --depth N), or give --days D to find the best "
                         "model for a time budget")
    found = budget(s, args.days, ratio, names=_recipe_names(args))
    command = ""
    if found:
        config, best = found[0]
        command = train_command(args, for_model(s, config), config.n_layer, best, best.tokens,
                                shard_set_for(config.arch).name)
    if args.json:
        print(json.dumps(report.budget_json(s, args.days, ratio, found, notes) | {"command": command or None},
                         indent=2))
    else:
        print(report.budget_text(s, args.days, ratio, found, notes, command))
    if args.plot and found:
        config, best = found[0]
        s = for_model(s, config)
        _plot(args, candidates(config, s, best.tokens, names=_recipe_names(args)), s,
              f"d{config.n_layer} on {s.gpu.name}, {best.tokens:,} tokens")
    elif args.plot:
        _plot(args, [], s, "")
    return 0


def _plan_model(args: argparse.Namespace, s, notes: list[str], depth: int, ratio: float | None) -> int:
    from onecard.plan import report
    from onecard.plan.search import (
        candidates,
        check_batch,
        default_tokens,
        fastest_fit,
        for_model,
        horizon,
        nearest_fit,
        overflow,
        whole_steps,
    )

    try:
        config = s.config(depth)
    except UsageError as error:
        raise UsageError(f"d{depth} has no valid shape: {error}") from None
    s = for_model(s, config)
    check_batch(s)
    counted, family_ratio = horizon(config)[1:]
    per = "tokens/param" if config.arch == "classic" else "tokens per matrix and lm_head parameter"
    names = _recipe_names(args)
    if args.days is not None:
        tokens, seconds = None, args.days * 86400
        cands = candidates(config, s, seconds=seconds, names=names)
    else:
        tokens = whole_steps(args.tokens, s.total_batch) if args.tokens is not None else \
            default_tokens(config, s, ratio)
        cands = candidates(config, s, tokens, names=names)
    best = fastest_fit(cands)
    why, nearest = "", None
    if best is None:
        why = overflow(cands, s.gpu.vram_bytes)
        given = int(args.tokens) if args.tokens is not None else None
        nearest = nearest_fit(depth, s, ratio, given, args.days * 86400 if args.days else None,
                              tried_all=names is None)
    shown_tokens = best.tokens if best else cands[0].tokens
    if args.days is not None and not shown_tokens:
        step = (best or cands[0]).timing.step_s
        where = "these cards" if s.gpus > 1 else "this card"
        raise UsageError(f"--days {args.days:g} is shorter than one optimizer step of {s.total_batch:,} tokens "
                         f"({step:,.3g} s with {(best or cands[0]).recipe.name} on {where}): give more days")
    if args.days is not None:
        line = (f"as many as fit in {quantity(args.days, 'day')}: {shown_tokens:,} with the best recipe "
                f"({report.amount(shown_tokens / counted)} {per})")
    elif args.tokens is not None:
        line = f"{tokens:,} ({report.amount(tokens / counted)} {per})"
    else:
        line = f"{tokens:,} ({ratio or family_ratio:g} {per})"
    steps = shown_tokens // s.total_batch
    line += (f" = {steps:,} step{'s' if steps != 1 else ''} of {s.total_batch:,} tokens, sequence {s.seq_len}"
             + (f", {s.gpus} GPUs" if s.gpus > 1 else ""))
    data = plan_shards(shown_tokens, shard_set_for(s.arch))  # the disk its text takes (datasources.py)
    data_line = f"{data.line()}; `onecard data download {data.shard_set.name} --shards {data.train_shards}`"
    command = train_command(args, s, depth, best, shown_tokens if args.days or args.tokens else None,
                            data.shard_set.name) if best else ""
    if args.json:
        out = report.plan_json(config, s, cands, best, shown_tokens, notes, why, nearest)
        out["data"] = {"dataset": data.shard_set.name, "chars_per_token": data.chars_per_token,
                       "train_shards": data.train_shards, "validation_shards": 1, "bytes": data.bytes}
        out["command"] = command or None
        print(json.dumps(out, indent=2))
    else:
        print(report.plan_text(config, s, cands, best, line, notes, why, nearest, data_line, command,
                               days=args.days))
    _plot(args, cands, s, f"d{depth} on {s.gpu.name}, {shown_tokens:,} tokens")
    return 0


def _recipe_names(args: argparse.Namespace) -> list[str] | None:
    """--recipe NAME: the one recipe every mode plans (None: all of them, the fastest that fits wins)."""
    return [args.recipe] if args.recipe else None


def _plot(args: argparse.Namespace, cands: list, s, title: str) -> None:
    """--plot in every mode: the picture, and a line saying where it went, or that there was none
    (stderr under --json, whose output must stay JSON)."""
    from onecard.plan import report

    if not args.plot:
        return
    if not cands:
        print(f"--plot {args.plot}: nothing drawn, no model fits", file=sys.stderr if args.json else sys.stdout)
        return
    report.plot(cands, s, args.plot, title)
    if not args.json:
        print(f"wrote {args.plot}")


def train_command(args: argparse.Namespace, s, depth: int, best, tokens: int | None, dataset: str,
                  total_batch: int | None = None) -> str:
    """The `onecard train` line that runs this plan's pick, recipe and micro-batch included: the plan
    is the recipe the trainer runs. `tokens` None: the family's own ratio (or --ratio) decides."""
    words = ["onecard", "train"] if s.gpus == 1 else \
        ["torchrun", "--standalone", "--nproc_per_node", str(s.gpus), "-m", "onecard.cli", "train"]
    words += ["--model", f"d{depth}"] + (["--arch", s.arch] if s.arch != "classic" else [])
    words += ["--data", f"data/{dataset}"]
    if tokens is not None:
        words += ["--tokens", str(tokens)]
    elif args.ratio is not None:
        words += ["--ratio", f"{args.ratio:g}"]
    batch = total_batch or args.total_batch
    for flag, value, default in (("--seq-len", args.seq_len, defaults.SEQ_LEN), ("--total-batch", batch, None),
                                 ("--vocab-size", args.vocab_size, None)):
        if value is not None and value != default:
            words += [flag, str(value)]
    if args.gpu:
        words += ["--gpu", s.gpu.key]
    if args.vram:
        words += ["--vram", f"{args.vram:g}GB"]
    words += ["--recipe", best.recipe.name, "--micro-batch", str(best.recipe.micro_batch)]
    if not args.compile:
        words.append("--no-compile")
    for pair in args.assume or []:  # the fit and the forecast the plan made, made again by train
        words += ["--assume", pair]
    if args.price != defaults.PRICE or args.currency != defaults.CURRENCY:  # the run's cost, as planned
        words += ["--price", f"{args.price:g}"] + (["--currency", args.currency]
                                                   if args.currency != defaults.CURRENCY else [])
    if args.power is not None:
        words += ["--power", f"{args.power:g}"]
    return shlex.join(words)
