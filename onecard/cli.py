"""`onecard` on the command line: train, sample, tokenizer train, info, plan, bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from onecard.errors import UsageError
from onecard.model import GPTConfig, flops_per_token, param_counts, parse_model_name

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

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="dN, e.g. d20 or d32 (default: a small demo model for the CPU)")
    p.add_argument("--depth", type=positive_int, help="depth N instead of --model dN")
    p.add_argument("--data", help="corpus: .txt/.jsonl/.parquet file or directory (default: embedded corpus, "
                                  "the Python standard library's own source)")
    p.add_argument("--run-dir", help="where the run is written (default runs/<date-time>)")
    p.add_argument("--init-from", help="start from the weights and tokenizer of an onecard run directory or a "
                                       "nanochat checkpoint directory")
    p.add_argument("--seq-len", type=positive_int, help="tokens per row (default 2048; demo 128)")
    p.add_argument("--micro-batch", type=positive_int, help="rows per forward/backward (default 8)")
    p.add_argument("--total-batch", type=positive_int,
                   help="tokens per optimizer step, reached by gradient accumulation (default 524288)")
    horizon = p.add_mutually_exclusive_group()
    horizon.add_argument("--steps", type=positive_int, help="optimizer steps")
    horizon.add_argument("--tokens", type=positive_int, help="training tokens (e.g. 38e9)")
    horizon.add_argument("--ratio", type=positive_float, help="training tokens per parameter (default 20)")
    p.add_argument("--vocab-size", type=positive_int, help="tokenizer size when training one (default 65536)")
    p.add_argument("--tokenizer-chars", type=positive_int, help="characters to train the tokenizer on")
    p.add_argument("--recipe", default="baseline", help="memory/time recipe (see onecard plan); default baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--eval-every", type=int, help="validation bits per byte every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=positive_int, default=8, help="validation micro-batches per evaluation")
    p.add_argument("--sample-prompt", default="", help="prompt for the sample printed at the end")


def run_train(args) -> int:
    from onecard.recipe import named_recipe
    from onecard.tokenizer import Tokenizer
    from onecard.train import TrainSettings, resolve_device, train
    from onecard.weights import load_weights

    device = resolve_device(args.device)
    demo = not (args.model or args.depth or args.init_from)
    corpus = load_corpus(args.data)
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    seq_len = args.seq_len or (DEMO["seq_len"] if demo else 2048)
    micro_batch = args.micro_batch or (DEMO["micro_batch"] if demo else 8)
    total_batch = args.total_batch or (DEMO["total_batch"] if demo else 524288)

    model = None
    if args.init_from:
        model, tokenizer, info = load_weights(args.init_from, device)
        config = model.config
        print(f"starting from {info['layout']} weights in {info['path']}")
    else:
        vocab = args.vocab_size or (DEMO["vocab_size"] if demo else 65536)
        chars = args.tokenizer_chars or (DEMO["tokenizer_chars"] if demo else 2_000_000_000)
        config = model_config_from_args(args, vocab, seq_len) or GPTConfig(
            sequence_len=seq_len, vocab_size=vocab, n_layer=DEMO["n_layer"], n_head=DEMO["n_head"],
            n_kv_head=DEMO["n_head"], n_embd=DEMO["n_embd"])
        from onecard.data import iter_texts
        print(f"training a {vocab:,}-token tokenizer on {corpus.describe()} ...", flush=True)
        started = time.perf_counter()
        tokenizer = Tokenizer.train(iter_texts(corpus, chars), vocab)
        print(f"  done in {time.perf_counter() - started:.1f} s")

    recipe = named_recipe(args.recipe, micro_batch=micro_batch, seq_len=seq_len)
    params = sum(param_counts(config).values())
    if args.steps:
        steps = args.steps
    elif args.tokens or args.ratio:
        tokens = args.tokens or args.ratio * params
        steps = max(1, round(tokens / total_batch))
    else:
        steps = DEMO["steps"] if demo else max(1, round(DEFAULT_RATIO * params / total_batch))
    eval_every = args.eval_every if args.eval_every is not None else (DEMO["eval_every"] if demo else 250)

    what = "demo model" if demo else f"d{config.n_layer}"
    print(f"{what}: {params:,} parameters (n_layer {config.n_layer}, n_embd {config.n_embd}, "
          f"vocab {config.vocab_size:,}, context {config.sequence_len}) on {device}, recipe {recipe.name}")
    print(f"{steps:,} steps × {total_batch:,} tokens = {steps * total_batch:,} tokens; run directory {run_dir}")
    settings = TrainSettings(run_dir=run_dir, steps=steps, total_batch=total_batch, seed=args.seed,
                             device=device, eval_every=eval_every, eval_batches=args.eval_batches,
                             sample_prompt=args.sample_prompt)
    result = train(config, tokenizer, corpus, recipe, settings, model=model)
    print(f"validation bits per byte: {result['val_bpb_start']:.4f} at step 0 -> {result['val_bpb_end']:.4f} "
          f"at step {steps}")
    print("sample:")
    print(result["sample"])
    print(f"\nrun saved in {run_dir}/ — continue a prompt with: onecard sample --run-dir {run_dir} --prompt '...'")
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
