"""Quality parity of the lean recipes on the CPU: same model, seed and data, each named recipe.

Trains a small model on the embedded corpus with every named recipe that runs on a CPU and
records the final validation bits per byte next to the fp32 baseline's. Writes
benchmarks/results/quality_parity_cpu.json and prints a markdown table.

    python benchmarks/quality_parity.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from onecard.data import Corpus, iter_texts
from onecard.model import GPTConfig
from onecard.pretrain import train
from onecard.recipe import NAMED
from onecard.run import TrainSettings
from onecard.tokenizer import Tokenizer

CPU_RECIPES = [name for name, r in NAMED.items() if r.matmul != "fp8" and r.loss != "fused"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--margin", type=float, default=0.02, help="allowed relative gap to the baseline")
    parser.add_argument("--out", default="benchmarks/results/quality_parity_cpu.json")
    args = parser.parse_args()

    corpus = Corpus.embedded()
    tokenizer = Tokenizer.train(iter_texts(corpus, 3_000_000), 2048)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=2, n_kv_head=2,
                       n_embd=128)
    rows = []
    for name in CPU_RECIPES:
        recipe = NAMED[name].with_(micro_batch=8, seq_len=128)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            settings = TrainSettings(run_dir=Path(run_dir), steps=args.steps, total_batch=4096, seed=0,
                                     eval_every=0, eval_batches=32, sample_tokens=1)
            result = train(config, tokenizer, corpus, recipe, settings, log=lambda *_: None)
        rows.append({"recipe": name, "val_bpb_start": result["val_bpb_start"], "val_bpb": result["val_bpb_end"],
                     "seconds": time.perf_counter() - started})
        print(f"{name}: {result['val_bpb_end']:.4f} bpb ({rows[-1]['seconds']:.0f} s)", flush=True)

    base = rows[0]["val_bpb"]
    for row in rows:
        row["gap_vs_baseline"] = row["val_bpb"] / base - 1
        row["within_margin"] = abs(row["gap_vs_baseline"]) <= args.margin
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "quality_parity_cpu", "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "command": f"python benchmarks/quality_parity.py --steps {args.steps}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "model": config.to_dict(), "steps": args.steps, "total_batch": 4096, "margin": args.margin,
        "corpus": corpus.describe(), "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n| recipe | val bpb | vs baseline | within {args.margin:.0%} |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['recipe']} | {row['val_bpb']:.4f} | {row['gap_vs_baseline']:+.2%} | "
              f"{'yes' if row['within_margin'] else 'no'} |")


if __name__ == "__main__":
    main()
