"""Can the data loader feed the card? Tokens per second of onecard's TokenLoader on N CPU cores
(default 2), beside the training rate the planner predicts for d12 and d20 on an RTX 4070.

The loader reads parquet shards one row group at a time, tokenizes whole documents with tiktoken
(its own threads) and packs them into rows, in the training process, between steps. It keeps up
when its rate is well above the training rate; the share of each step it takes is
training rate / loader rate (the loader does not overlap the step).

Data: --data (a folder of FineWeb-EDU shards, say, from `onecard data download`), else shards
written here of English prose that is on every machine: the docstrings and comments of Python's
standard library, one module a document (~web-page sized), in row groups of 1,024 documents as
nanochat's shards. Tokenizer: --tokenizer DIR, else a BPE trained here (--vocab-size, default
32,768: the prose on this machine is too little for 65,536; tiktoken's speed depends little on the
vocabulary). Results go to benchmarks/results/loader_throughput_<date>.json (command, machine,
date, commit) and a markdown row is printed for benchmarks/README.md.

    python benchmarks/loader_throughput.py                     # 2 cores, 20 s per measurement
    python benchmarks/loader_throughput.py --data data/fineweb-edu --tokenizer runs/x/tokenizer
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
import tokenize
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import commit, cpu_name  # noqa: E402

from onecard.data import Corpus, iter_texts
from onecard.loader import TokenLoader
from onecard.plan.choose import build_settings, choose_gpu
from onecard.plan.search import candidates, config_params, fastest_fit
from onecard.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
TARGET_D12 = 55_000  # the figure for a d12-sized model on a 4070-class card (tokens/s)


def prose_of(path: Path) -> str:
    """A module's docstrings and comments, in order: English prose, not code."""
    source = path.read_bytes()
    parts = []
    try:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
        for token in tokenize.tokenize(io.BytesIO(source).readline):
            if token.type == tokenize.COMMENT and len(token.string) > 20:
                parts.append(token.string.lstrip("# "))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return ""
    return "\n\n".join(parts)


def write_prose_shards(folder: Path, shards: int = 2, rows_per_group: int = 1024) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [text for p in sorted(stdlib.rglob("*.py"))
            if not {"site-packages", "test", "tests", "idle_test"} & set(p.parts)
            and len(text := prose_of(p)) > 500]
    for i in range(shards):  # each shard the whole prose again: enough row groups to stream through
        table = pa.table({"text": docs * 4})
        pq.write_table(table, folder / f"shard_{i:05d}.parquet", row_group_size=rows_per_group)
    chars = sum(map(len, docs))
    return {"documents": len(docs), "characters": chars, "mean_doc_chars": chars / len(docs),
            "what": "docstrings and comments of Python's standard library, one module a document"}


def measure(loader: TokenLoader, seconds: float) -> dict:
    loader.next_batch()  # the first row group and the tokenizer's warm-up
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        inputs, _ = loader.next_batch()
        tokens += inputs.numel()
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def measure_encoding(tokenizer: Tokenizer, corpus: Corpus, seconds: float) -> dict:
    """tiktoken alone on the same documents, one call per document: what bounds the loader if not its packing."""
    texts = [text for _, text in zip(range(2000), (t for _, t in corpus.documents()), strict=False)]
    chars = tokens = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for text in texts:
            tokens += len(tokenizer.encode(text))
            chars += len(text)
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "chars_per_s": chars / elapsed, "seconds": elapsed}


def planner_rates() -> dict:
    """The planner's training rate on an RTX 4070, fastest recipe that fits, 20 tokens/param."""
    gpu, notes = choose_gpu("rtx4070", None, None)
    s = build_settings(gpu, notes, seq_len=2048, total_batch=524_288, micro_batch=None, vocab_size=65_536)
    out = {}
    for depth in (12, 20):
        config = s.config(depth)
        best = fastest_fit(candidates(config, s, tokens=20 * config_params(config)))
        out[f"d{depth}"] = {"recipe": best.recipe.name, "tokens_per_s": best.timing.tokens_per_s}
    return out


def chars_per_token(tokenizer: Tokenizer, corpus: Corpus, chars: int = 2_000_000) -> float:
    texts = list(iter_texts(corpus, chars, doc_chars=10**9))
    return sum(map(len, texts)) / sum(map(len, tokenizer.encode_batch(texts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a corpus folder (default: prose shards written to a temporary folder)")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: train one here)")
    parser.add_argument("--vocab-size", type=int, default=32_768)
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the process may use (default 2)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--batch", type=int, default=8, help="rows per next_batch() (default 8)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    plan = planner_rates()
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    with tempfile.TemporaryDirectory() as tmp:
        data_info = {"path": args.data}
        if not args.data:
            data_info = write_prose_shards(Path(tmp))
            args.data = tmp
        corpus = Corpus(args.data)
        if args.tokenizer:
            tokenizer = Tokenizer.load(args.tokenizer)
        else:
            started = time.perf_counter()
            tokenizer = Tokenizer.train(iter_texts(Corpus.embedded(), 30_000_000), args.vocab_size)
            print(f"trained a {args.vocab_size:,}-token BPE on the embedded corpus in "
                  f"{time.perf_counter() - started:.0f} s")
        compression = chars_per_token(tokenizer, corpus)
        rows = {}
        for n in sorted({1, len(cores)}):
            os.sched_setaffinity(0, cores[:n])
            loader = TokenLoader(corpus, tokenizer, args.batch, args.seq_len)
            rows[f"{n}_core" + ("s" if n > 1 else "")] = measure(loader, args.seconds)
            print(f"{n} core(s): {rows[list(rows)[-1]]['tokens_per_s']:,.0f} tokens/s")
        os.sched_setaffinity(0, cores[:1])
        encoding = measure_encoding(tokenizer, corpus, args.seconds)
        print(f"tiktoken alone, 1 core: {encoding['tokens_per_s']:,.0f} tokens/s, "
              f"{encoding['chars_per_s'] / 1e6:.1f} M characters/s")
    best = rows[list(rows)[-1]]["tokens_per_s"]
    result = {
        "benchmark": "loader_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_name(), "cores_used": len(cores), "cores_present": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "pyarrow": pa.__version__, "tiktoken": _version("tiktoken")},
        "data": data_info, "corpus": corpus.describe(), "vocab_size": tokenizer.vocab_size,
        "chars_per_token": compression, "batch": [args.batch, args.seq_len], "loader": rows,
        "tiktoken_alone_1_core": encoding,
        "planner_rtx4070": plan, "target_d12_tokens_per_s": TARGET_D12,
        "loader_share_of_step": {k: v["tokens_per_s"] / best for k, v in plan.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loader_throughput_{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    d12, d20 = plan["d12"]["tokens_per_s"], plan["d20"]["tokens_per_s"]
    print(f"| {len(cores)} cores, {cpu_name()} | {tokenizer.vocab_size:,} | {compression:.2f} | {best:,.0f} | "
          f"{d12:,.0f} ({best / d12:.0f}x) | {d20:,.0f} ({best / d20:.0f}x) | {best / TARGET_D12:.0f}x |")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
