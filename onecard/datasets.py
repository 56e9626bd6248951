"""The data stage on the command line: `onecard tokenizer train` (a BPE tokenizer from a corpus) and
`onecard data download` (pre-training shards, the CORE eval bundle and chat data, resumable and verified)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from onecard import defaults
from onecard.args import positive_float, positive_int, text_arg
from onecard.errors import UsageError
from onecard.model_config import ARCHS


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a BPE tokenizer on a corpus",
                       description="Train a byte-level BPE tokenizer (nanochat's split pattern and special "
                                   "tokens) and save it as tokenizer.json plus nanochat's tokenizer.pkl.")
    t.add_argument("--data", type=text_arg,
                   help="corpus: .txt/.jsonl/.parquet file or directory (default: the embedded corpus)")
    t.add_argument("--vocab-size", type=positive_int,
                   help=f"vocabulary size incl. 9 special tokens (default {defaults.VOCAB_SIZE} with --data; on the "
                        f"embedded corpus, which supports fewer, the demo's {defaults.DEMO['vocab_size']:,})")
    t.add_argument("--max-chars", type=positive_int, default=2_000_000_000,
                   help="characters of training text to read at most (default 2e9)")
    t.add_argument("--out", type=text_arg, default="tokenizer", help="output directory (default ./tokenizer)")
    t.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")


def run_tokenizer(args: argparse.Namespace) -> int:
    from onecard.data import Corpus, iter_texts
    from onecard.tokenizer import Tokenizer, check_save_folder, check_vocab_size

    # before the work, not after it; a run resumed with --tokenizer DIR would refuse a replaced one
    check_save_folder(Path(args.out), replace=args.force)
    corpus = Corpus(args.data) if args.data else Corpus.embedded()
    if args.vocab_size is None:
        args.vocab_size = defaults.VOCAB_SIZE if args.data else defaults.DEMO["vocab_size"]
    check_vocab_size(args.vocab_size)  # before "training a 10-token BPE" is said
    print(f"training a {args.vocab_size:,}-token BPE on {corpus.describe()} (at most {args.max_chars:,} chars)")
    started = time.perf_counter()
    tokenizer = Tokenizer.train(iter_texts(corpus, args.max_chars), args.vocab_size)
    tokenizer.save(Path(args.out))
    print(f"done in {time.perf_counter() - started:.1f} s: {tokenizer.vocab_size:,} tokens saved to {args.out}/")
    return 0


# ---------------------------------------------------------------- data download

def add_data_arguments(p: argparse.ArgumentParser) -> None:
    from onecard.datasources import CHARS_PER_TOKEN, DATASETS

    sub = p.add_subparsers(dest="data_command", required=True)
    d = sub.add_parser(
        "download", help="download pre-training shards, the CORE eval bundle or chat data",
        description="Download FineWeb-EDU or ClimbMix parquet shards (nanochat's sets: the last shard is the "
                    "validation split), the CORE eval bundle, or the chat data nanochat's SFT and chat evaluation "
                    "read (smoltalk, arc, mmlu, gsm8k; `chat` for all four): parallel, resumed after a dropped "
                    "connection or a restart, retried with backoff, each file verified before it counts; a rerun "
                    "skips what is complete.")
    d.add_argument("dataset", type=text_arg, help=f"what to download: {', '.join(DATASETS)}")
    d.add_argument("--dir", type=text_arg, help="where to put it (default data/DATASET; data/eval_bundle for the "
                                                "eval bundle, which is unpacked there; `chat` puts each set in "
                                                "data/SET)")
    how = d.add_mutually_exclusive_group()
    how.add_argument("--shards", type=positive_int, help="this many training shards (the validation shard comes too)")
    how.add_argument("--tokens", type=positive_float, help="enough shards for this many training tokens, e.g. 11.2B")
    how.add_argument("--for-model", type=text_arg, metavar="dN",
                     help="enough shards to train model dN at --ratio tokens per parameter")
    d.add_argument("--ratio", type=positive_float,
                   help=f"tokens per parameter with --for-model (default {defaults.RATIO}, Chinchilla; "
                        "nanochat-2026: its own, per matrix and lm_head parameter)")
    d.add_argument("--arch", choices=ARCHS, default="classic",
                   help="the model family --for-model sizes (default classic)")
    d.add_argument("--chars-per-token", type=positive_float, default=CHARS_PER_TOKEN,
                   help=f"your tokenizer's compression, to turn tokens into shards (default {CHARS_PER_TOKEN}: "
                        "nanochat's tokenizer on FineWeb-EDU)")
    d.add_argument("--base-url", type=text_arg, help="a mirror: the folder URL of the shards, or a pattern with "
                                                     "{index} or {name} (default: Hugging Face, or the mirror "
                                                     "HF_ENDPOINT names; for a chat set, {name} is the file's path "
                                                     "in the dataset; for the eval bundle, the zip's own URL "
                                                     "too)")
    d.add_argument("--workers", type=positive_int, default=4, help="files fetched at once (default 4)")
    d.add_argument("--retries", type=positive_int, default=8,
                   help="failed attempts in a row (without new bytes) before a file is given up (default 8)")
    d.add_argument("--timeout", type=positive_float, default=60.0,
                   help="seconds without a byte before a connection counts as stalled and is resumed (default 60)")
    d.add_argument("--no-checksum", action="store_true",
                   help="do not check the SHA-256 that Hugging Face names (size and content are still checked)")
    d.add_argument("--dry-run", action="store_true", help="say what would be fetched and how much, and exit")


def run_data(args: argparse.Namespace) -> int:
    from onecard import datasources as ds
    from onecard.download import Settings
    from onecard.fetch import download_eval_bundle, download_shards

    source = ds.find(args.dataset)
    if args.base_url:
        ds.check_base_url(args.base_url)
    if (args.ratio is not None or args.arch != "classic") and not args.for_model:
        raise UsageError("--ratio and --arch go with --for-model dN")
    settings = Settings(workers=min(args.workers, 64), attempts=args.retries, timeout_s=args.timeout,
                        checksums=not args.no_checksum)
    if isinstance(source, ds.ShardSet):
        folder = Path(args.dir) if args.dir else Path("data") / source.name
        download_shards(source, folder, _train_shards(args, source), settings, args.base_url, args.dry_run)
        return 0
    if args.shards or args.tokens or args.for_model:
        raise UsageError(f"{args.dataset} comes whole: drop --shards, --tokens and --for-model")
    if isinstance(source, ds.SingleFile):
        download_eval_bundle(Path(args.dir or "data/eval_bundle"), settings, args.base_url, args.dry_run)
        return 0
    return _download_chat_data(args, [source] if isinstance(source, ds.FileSet) else list(ds.FILE_SETS.values()),
                               settings)


def _download_chat_data(args: argparse.Namespace, file_sets: list, settings) -> int:
    """Each set into its folder; a set that fails does not stop the others, and the command fails at the end."""
    from onecard.download import DownloadError
    from onecard.fetch import download_files

    if len(file_sets) > 1 and (args.dir or args.base_url):
        raise UsageError("`chat` puts each set in data/SET from Hugging Face: download the sets one by one for "
                         "--dir or --base-url (HF_ENDPOINT=URL names a Hugging Face mirror for all of them)")
    failed = []
    for file_set in file_sets:
        try:
            download_files(file_set, Path(args.dir or Path("data") / file_set.name), settings, args.base_url,
                           args.dry_run)
        except DownloadError as e:
            if len(file_sets) == 1:
                raise
            print(f"{file_set.name}: {e}")
            failed.append(file_set.name)
    if failed:
        raise DownloadError(f"{', '.join(failed)} could not be fetched whole (said above); rerun the same command "
                            "to resume")
    return 0


def _train_shards(args: argparse.Namespace, source) -> int:
    from onecard import datasources as ds
    from onecard.model_config import ARCH_2026, MAX_DEPTH, VOCAB_2026, GPTConfig, parse_model_name
    from onecard.plan.search import horizon

    if args.shards:
        return args.shards
    if args.tokens:
        tokens, what = args.tokens, f"{args.tokens:.4g} tokens"
    elif args.for_model:
        try:
            depth = parse_model_name(args.for_model)
        except UsageError:
            raise UsageError(f"--for-model {args.for_model!r}: give dN with N from 1 to {MAX_DEPTH}, "
                             "e.g. d20") from None
        vocab = VOCAB_2026 if args.arch == ARCH_2026 else defaults.VOCAB_SIZE
        config = GPTConfig.from_depth(depth, vocab_size=vocab, arch=args.arch)
        _, counted, family_ratio = horizon(config)  # what `onecard train` counts and its default ratio
        ratio = args.ratio if args.ratio is not None else family_ratio
        per = "parameter" if args.arch == "classic" else "matrix and lm_head parameter"
        tokens, what = ratio * counted, f"d{depth} ({counted:,} {per}s) at {ratio:g} tokens per {per}"
    else:
        raise UsageError(f"say how much {source.name} to fetch: --shards N, --tokens T (e.g. 11.2B) or --for-model dN")
    plan = ds.plan_shards(tokens, source, args.chars_per_token)
    print(f"plan: {what}: {plan.line()}")
    return plan.train_shards
