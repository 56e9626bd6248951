"""`onecard` on the command line: train, report, sample, tokenizer train, info, plan, bench."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from onecard import distributed
from onecard.errors import UsageError
from onecard.model import GPTConfig, flops_per_token, param_counts, parse_model_name
from onecard.plan.cli import gigabytes
from onecard.recipe import CHOICES, NAMED

DEFAULT_RATIO = 20  # Chinchilla: tokens per parameter (REFERENCE §1)

# The embedded default: small enough to train in a few minutes on two CPU cores.
DEMO = dict(n_layer=4, n_embd=128, n_head=2, seq_len=128, vocab_size=2048, micro_batch=8,
            total_batch=4096, steps=300, eval_every=50, tokenizer_chars=3_000_000)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what was wrong and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = parse_number(text)
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def positive_float(text: str) -> float:
    value = parse_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_number(text: str) -> float:
    """Accepts 38e9, 38_000_000_000 and 524288 alike."""
    try:
        return float(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def model_config_from_args(args, vocab_size: int, seq_len: int) -> GPTConfig | None:
    """--model dN or --depth N applies nanochat's depth dial; neither gives None."""
    if args.model and args.depth:
        raise UsageError("give --model or --depth, not both")
    if args.model:
        return GPTConfig.from_depth(parse_model_name(args.model), vocab_size=vocab_size, sequence_len=seq_len)
    if args.depth:
        return GPTConfig.from_depth(args.depth, vocab_size=vocab_size, sequence_len=seq_len)
    return None


# ---------------------------------------------------------------- info

def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="dN, e.g. d20 or d32 (nanochat's depth dial)")
    p.add_argument("--depth", type=positive_int, help="depth N instead of --model dN")
    p.add_argument("--vocab-size", type=positive_int, default=65536, help="vocabulary size (default 65536)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="context length (default 2048)")
    p.add_argument("--ratio", type=positive_float, default=DEFAULT_RATIO,
                   help="training tokens per parameter (default 20, Chinchilla)")


def run_info(args) -> int:
    config = model_config_from_args(args, args.vocab_size, args.seq_len)
    if config is None:
        raise UsageError("onecard info needs --model dN or --depth N")
    counts = param_counts(config)
    total = sum(counts.values())
    fpt = flops_per_token(config)
    tokens = args.ratio * total
    print(f"model d{config.n_layer}: n_layer {config.n_layer}, n_embd {config.n_embd}, n_head {config.n_head}, "
          f"n_kv_head {config.n_kv_head}, head_dim {config.head_dim}, vocab {config.vocab_size:,}, "
          f"context {config.sequence_len}")
    print(f"parameters: {total:,}")
    for name, count in counts.items():
        print(f"  {name:<8} {count:>15,}  ({count / total:6.1%})")
    print(f"FLOPs per token (training, 6·N_non-embedding + 12·L·H·Q·T): {fpt:,} = {fpt:.5e}")
    print(f"Chinchilla tokens ({args.ratio:g} per parameter): {tokens:,.0f} = {tokens:.4e}")
    print(f"total training FLOPs: {fpt * tokens:.4e}")
    return 0


# ---------------------------------------------------------------- tokenizer

def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer on a corpus",
                       description="Train a byte-level BPE tokenizer (nanochat's split pattern and special "
                                   "tokens) and save it as tokenizer.json plus nanochat's tokenizer.pkl.")
    t.add_argument("--data", help="corpus: .txt/.jsonl/.parquet file or directory (default: the embedded corpus)")
    t.add_argument("--vocab-size", type=positive_int, default=65536, help="vocabulary size incl. 9 special tokens")
    t.add_argument("--max-chars", type=positive_int, default=2_000_000_000,
                   help="characters of training text to read at most (default 2e9)")
    t.add_argument("--out", default="tokenizer", help="output directory (default ./tokenizer)")


def load_corpus(data: str | None):
    from onecard.data import Corpus
    return Corpus(data) if data else Corpus.embedded()


def run_tokenizer(args) -> int:
    from onecard.data import iter_texts
    from onecard.tokenizer import Tokenizer
    corpus = load_corpus(args.data)
    print(f"training a {args.vocab_size:,}-token BPE on {corpus.describe()} (at most {args.max_chars:,} chars)")
    started = time.perf_counter()
    tokenizer = Tokenizer.train(iter_texts(corpus, args.max_chars), args.vocab_size)
    tokenizer.save(Path(args.out))
    print(f"done in {time.perf_counter() - started:.1f} s: {tokenizer.vocab_size:,} tokens saved to {args.out}/")
    return 0


# ---------------------------------------------------------------- train

def non_negative_float(text: str) -> float:
    value = parse_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = parse_number(text)
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return int(value)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="dN, e.g. d20 or d32 (default: a small demo model for the CPU)")
    p.add_argument("--depth", type=positive_int, help="depth N instead of --model dN")
    p.add_argument("--data", help="corpus: .txt/.jsonl/.parquet file or directory (default: embedded corpus, "
                                  "the Python standard library's own source)")
    p.add_argument("--run-dir", help="where the run is written (default runs/<date-time>); a directory that "
                                     "holds a checkpoint is resumed")
    p.add_argument("--init-from", help="start from the weights and tokenizer of an onecard run directory or a "
                                       "nanochat checkpoint directory")
    p.add_argument("--seq-len", type=positive_int, help="tokens per row (default 2048; demo 128)")
    p.add_argument("--micro-batch", type=positive_int,
                   help="rows per forward/backward (default: the largest that fits the card; 8 on the CPU)")
    p.add_argument("--total-batch", type=positive_int,
                   help="tokens per optimizer step, reached by gradient accumulation (default 524288)")
    horizon = p.add_mutually_exclusive_group()
    horizon.add_argument("--steps", type=positive_int, help="optimizer steps")
    horizon.add_argument("--tokens", type=positive_int, help="training tokens (e.g. 38e9)")
    horizon.add_argument("--ratio", type=positive_float, help="training tokens per parameter (default 20)")
    p.add_argument("--vocab-size", type=positive_int, help="tokenizer size when training one (default 65536)")
    p.add_argument("--tokenizer-chars", type=positive_int, help="characters to train the tokenizer on")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--eval-every", type=int, help="validation bits per byte every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=positive_int, help="validation micro-batches per evaluation (default 8)")
    p.add_argument("--sample-prompt", help="prompt for the sample printed at the end")
    lean = p.add_argument_group(
        "recipe: how the run spends memory and time (onecard/recipe.py; onecard plan predicts each)")
    lean.add_argument("--recipe", help=f"a named recipe: {', '.join(NAMED)} (default: the fastest that fits "
                                       "--gpu/--vram or this machine's CUDA card; on the CPU baseline)")
    lean.add_argument("--gpu", help="card to fit the recipe to, e.g. rtx4070 (default: this machine's CUDA card)")
    lean.add_argument("--vram", type=gigabytes, help="memory to fit in, e.g. 12GB or 8GB (default: the card's)")
    for key, allowed in CHOICES.items():
        lean.add_argument("--" + key.replace("_", "-"), choices=allowed, help=f"override the recipe's {key}")
    lean.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model "
                                                                                "(default off)")
    lean.add_argument("--dry-run", action="store_true", help="print the chosen recipe with its predicted memory "
                                                             "and step time, and exit")
    saving = p.add_argument_group("checkpoints and resuming")
    saving.add_argument("--save-every-min", type=non_negative_float,
                        help="write a checkpoint every M minutes (default 30; 0: off)")
    saving.add_argument("--save-every-steps", type=non_negative_int,
                        help="write a checkpoint every K steps (default 0: off); always one at the end")
    saving.add_argument("--keep", type=positive_int, help="checkpoints kept (default 3)")
    saving.add_argument("--force-new", action="store_true",
                        help="start a new run although --run-dir holds one (its files move to previous-<time>/)")
    energy = p.add_argument_group("energy and cost")
    energy.add_argument("--price", type=non_negative_float, help="electricity price per kWh, for the cost")
    energy.add_argument("--currency", help="currency of --price (default USD)")
    energy.add_argument("--power", type=positive_float,
                        help="power draw in watts, for an energy estimate where NVML cannot measure it")


def saved_run_config(run_dir: Path) -> dict | None:
    """The config of the run a directory holds, if it has a checkpoint to resume from."""
    from onecard import checkpoint
    if not checkpoint.has_checkpoint(run_dir):
        return None
    path = run_dir / "config.json"
    if not path.exists():  # written at each session's start; each checkpoint keeps a copy too
        path = checkpoint.step_dirs(run_dir)[-1][1] / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} ({error}): start over with --force-new") from None


def run_train(args) -> int:
    from onecard.train import resolve_device

    device = resolve_device(args.device)
    world = distributed.init(device)  # several ranks when started by torchrun
    try:
        code = train_command(args, device, world)
        distributed.barrier(world)  # rank 0 writes last: no rank leaves the group before it is done
        return code
    finally:
        distributed.finish(world)


def train_command(args, device: str, world) -> int:
    """`onecard train` on this rank (rank 0 alone prints)."""
    from onecard.fit import choose_recipe, compare_text, dry_run_text, prediction_record
    from onecard.recipe import Recipe
    from onecard.tokenizer import Tokenizer
    from onecard.train import TrainSettings, train
    from onecard.weights import load_weights

    say = print if world.main else (lambda *_args, **_kwargs: None)
    run_dir = Path(distributed.from_rank0(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}", world))
    saved = None if args.force_new else saved_run_config(run_dir)
    if saved and args.init_from:
        raise UsageError(f"{run_dir} holds a run to resume; --init-from starts a new one: drop it, or add "
                         "--force-new")
    before = saved["train"] if saved else {}

    def pick(given, key: str, default):
        """What was given, else what the resumed run used, else the default."""
        return given if given is not None else before.get(key, default)

    demo = not (args.model or args.depth or args.init_from or saved)
    data = pick(args.data, "data", None)
    corpus = load_corpus(data)
    model = tokenizer = None
    if saved:
        seq_len = args.seq_len or saved["recipe"]["seq_len"]
        micro_batch = args.micro_batch or saved["recipe"]["micro_batch"]
        vocab = args.vocab_size or saved["model_config"]["vocab_size"]
        config = model_config_from_args(args, vocab, seq_len) or GPTConfig(
            **{**saved["model_config"], "vocab_size": vocab,
               "sequence_len": args.seq_len or saved["model_config"]["sequence_len"]})
    elif args.init_from:
        model, tokenizer, info = load_weights(args.init_from, device)
        config = model.config
        seq_len, micro_batch = args.seq_len or config.sequence_len, args.micro_batch
        say(f"starting from {info['layout']} weights in {info['path']}")
    else:
        seq_len, micro_batch = args.seq_len or (DEMO["seq_len"] if demo else 2048), args.micro_batch
        vocab = args.vocab_size or (DEMO["vocab_size"] if demo else 65536)
        config = model_config_from_args(args, vocab, seq_len) or GPTConfig(
            sequence_len=seq_len, vocab_size=vocab, n_layer=DEMO["n_layer"], n_head=DEMO["n_head"],
            n_kv_head=DEMO["n_head"], n_embd=DEMO["n_embd"])

    total_batch = pick(args.total_batch, "total_batch", DEMO["total_batch"] if demo else 524288)
    params = sum(param_counts(config).values())
    if args.steps:
        steps = args.steps
    elif args.tokens or args.ratio:
        tokens = args.tokens or args.ratio * params
        steps = max(1, round(tokens / total_batch))
    else:
        steps = before.get("steps") or (DEMO["steps"] if demo else max(1, round(DEFAULT_RATIO * params / total_batch)))
    eval_every = pick(args.eval_every, "eval_every", DEMO["eval_every"] if demo else 250)

    choice = choose_recipe(args, config, device, seq_len=seq_len, micro_batch=micro_batch, total_batch=total_batch,
                           tokens=steps * total_batch, resumed=Recipe.from_dict(saved["recipe"]) if saved else None,
                           gpus=world.size)
    recipe = choice.recipe
    what = "demo model" if demo else f"d{config.n_layer}"
    say(f"{what}: {params:,} parameters (n_layer {config.n_layer}, n_embd {config.n_embd}, "
          f"vocab {config.vocab_size:,}, context {config.sequence_len}) on {device}, recipe {recipe.name}")
    say(f"{steps:,} steps × {total_batch:,} tokens = {steps * total_batch:,} tokens; run directory {run_dir}")
    if args.dry_run:
        say(dry_run_text(choice, config))
        return 0
    for note in choice.notes:
        say(f"note: {note}")
    if saved:
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
        say(f"{run_dir} holds a run: resuming it")
    elif tokenizer is None:
        tokenizer = shared_tokenizer(args, corpus, config.vocab_size, demo, run_dir, world, say)
    settings = TrainSettings(
        run_dir=run_dir, steps=steps, total_batch=total_batch, seed=pick(args.seed, "seed", 0), device=device,
        eval_every=eval_every, eval_batches=pick(args.eval_batches, "eval_batches", 8),
        sample_prompt=pick(args.sample_prompt, "sample_prompt", ""), data=data,
        save_every_min=pick(args.save_every_min, "save_every_min", 30.0),
        save_every_steps=pick(args.save_every_steps, "save_every_steps", 0), keep=pick(args.keep, "keep", 3),
        force_new=args.force_new, price=pick(args.price, "price", None),
        currency=pick(args.currency, "currency", "USD"), power_watts=pick(args.power, "power_watts", None))
    prediction = prediction_record(choice, device)
    if prediction:
        say(f"planner predicts on {prediction['gpu']}: peak {prediction['peak_bytes'] / 2**30:.2f} GiB "
              f"({prediction['peak_allocated_bytes'] / 2**30:.2f} GiB allocated), "
              f"{prediction['step_time_s']:.2f} s per step, {prediction['tokens_per_s']:,.0f} tokens/s")
    result = train(config, tokenizer, corpus, recipe, settings, model=model, prediction=prediction, world=world)
    resume = f"onecard train --run-dir {run_dir}"
    if result["stopped"] == "nonfinite":
        print(f"onecard: {result['message']}; checkpoint of step {result['last_checkpoint']} in {run_dir}/ "
              f"(resume: {resume})", file=sys.stderr)
        return 1
    if result["stopped"]:
        where = ("no checkpoint could be written" if result["last_checkpoint"] is None
                 else f"checkpoint of step {result['last_checkpoint']} saved")
        say(f"stopped at step {result['step']} of {steps}, {where}; resume with: {resume}")
        return 0
    if prediction:
        say(compare_text(prediction, result["summary"], result["history"], total_batch))
    say(f"validation bits per byte: {result['val_bpb_start']:.4f} at step 0 -> {result['val_bpb_end']:.4f} "
          f"at step {steps}")
    say("sample:")
    say(result["sample"])
    say(f"\nrun saved in {run_dir}/ — continue a prompt with: onecard sample --run-dir {run_dir} --prompt '...'; "
          f"charts: onecard report {run_dir}")
    return 0


def shared_tokenizer(args, corpus, vocab_size: int, demo: bool, run_dir: Path, world, say):
    """Train the run's tokenizer; with several ranks, rank 0 trains it and the others read it."""
    from onecard.data import iter_texts
    from onecard.tokenizer import Tokenizer
    handoff = run_dir / ".tokenizer-for-ranks"
    if world.main:
        chars = args.tokenizer_chars or (DEMO["tokenizer_chars"] if demo else 2_000_000_000)
        say(f"training a {vocab_size:,}-token tokenizer on {corpus.describe()} ...", flush=True)
        started = time.perf_counter()
        tokenizer = Tokenizer.train(iter_texts(corpus, chars), vocab_size)
        say(f"  done in {time.perf_counter() - started:.1f} s")
        if world.size > 1:
            tokenizer.save(handoff)
    distributed.barrier(world)
    if not world.main:
        tokenizer = Tokenizer.load(handoff)
    distributed.barrier(world)
    if world.main and world.size > 1:
        shutil.rmtree(handoff, ignore_errors=True)
    return tokenizer


# ---------------------------------------------------------------- report

def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="an onecard run directory (with log.jsonl)")
    p.add_argument("--out", help="where the PNG files and report.html go (default RUN_DIR/report)")


def run_report(args) -> int:
    from onecard.report import write_report
    page = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"report written: {page} (and the PNG files beside it)")
    return 0


# ---------------------------------------------------------------- sample

def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="an onecard run directory or a nanochat checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--tokenizer", help="tokenizer.pkl or directory, for a nanochat checkpoint kept elsewhere")


def run_sample(args) -> int:
    from onecard.train import resolve_device, sample_text
    from onecard.weights import load_weights
    device = resolve_device(args.device)
    model, tokenizer, _ = load_weights(args.run_dir, device, tokenizer_path=args.tokenizer)
    print(sample_text(model, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed))
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from onecard.plan.cli import add_bench_arguments, add_plan_arguments, run_bench, run_plan
    parser = Parser(
        prog="onecard",
        description="Train a nanochat-class chat model from scratch on one consumer GPU, and know "
                    "beforehand whether it fits, how long it takes and what it costs.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [
        ("train", "train a model (no arguments: a small demo on the embedded corpus)",
         add_train_arguments, run_train),
        ("report", "draw a run's loss, throughput, memory, power and energy as PNG files and one HTML page",
         add_report_arguments, run_report),
        ("sample", "continue a prompt with a trained model", add_sample_arguments, run_sample),
        ("tokenizer", "tokenizer tools", add_tokenizer_arguments, run_tokenizer),
        ("info", "a model's dimensions, parameters and FLOPs", add_info_arguments, run_info),
        ("plan", "predict memory, time, energy and cost of training a model on a card",
         add_plan_arguments, run_plan),
        ("bench", "measure this machine's card to calibrate the planner", add_bench_arguments, run_bench),
    ]
    for name, help_text, add_arguments, run in commands:
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"onecard: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nonecard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
