"""The data stage on the command line: `onecard tokenizer train` (a BPE tokenizer from a corpus)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from onecard import defaults
from onecard.args import positive_int, text_arg


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer on a corpus",
                       description="Train a byte-level BPE tokenizer (nanochat's split pattern and special "
                                   "tokens) and save it as tokenizer.json plus nanochat's tokenizer.pkl.")
    t.add_argument("--data", type=text_arg,
                   help="corpus: .txt/.jsonl/.parquet file or directory (default: the embedded corpus)")
    t.add_argument("--vocab-size", type=positive_int, default=defaults.VOCAB_SIZE,
                   help=f"vocabulary size incl. 9 special tokens (default {defaults.VOCAB_SIZE})")
    t.add_argument("--max-chars", type=positive_int, default=2_000_000_000,
                   help="characters of training text to read at most (default 2e9)")
    t.add_argument("--out", type=text_arg, default="tokenizer", help="output directory (default ./tokenizer)")


def run_tokenizer(args: argparse.Namespace) -> int:
    from onecard.data import Corpus, iter_texts
    from onecard.tokenizer import Tokenizer, check_save_folder

    check_save_folder(Path(args.out))  # before the work, not after it
    corpus = Corpus(args.data) if args.data else Corpus.embedded()
    print(f"training a {args.vocab_size:,}-token BPE on {corpus.describe()} (at most {args.max_chars:,} chars)")
    started = time.perf_counter()
    tokenizer = Tokenizer.train(iter_texts(corpus, args.max_chars), args.vocab_size)
    tokenizer.save(Path(args.out))
    print(f"done in {time.perf_counter() - started:.1f} s: {tokenizer.vocab_size:,} tokens saved to {args.out}/")
    return 0
