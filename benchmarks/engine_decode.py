"""Decode speed of the KV-cache engine against full recomputation, side by side in one run.

Both decode greedily from the same prompt with the same model (the CPU demo's shape, or a run's
weights with --run-dir): the engine runs the prompt once and then one token per step through its
cache; full recomputation runs the whole sequence again for every new token. Both produce the
same tokens (tests/test_engine.py proves it); this measures how long each takes.

    python benchmarks/engine_decode.py [--run-dir RUN] [--new-tokens 256] [--prompt-tokens 64]

Writes benchmarks/results/engine_decode_<date>.json with the command, machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this is loaded
from common import commit, demo_model  # noqa: E402

from onecard.engine import Engine, Sampling
from onecard.weights import load_weights

HERE = Path(__file__).resolve().parent


@torch.inference_mode()  # the same mode as the engine: the comparison is of the cache alone
def full_recompute(model, prompt: list[int], new_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(new_tokens):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def timed(fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(3):  # the best of three: the machine's other work only ever adds time
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a trained model instead of the demo shape with random weights")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    model, tokenizer = load_weights(args.run_dir)[:2] if args.run_dir else demo_model()
    model.eval()
    prompt = tokenizer.encode("def main(argv):\n    parser = argparse.ArgumentParser(", prepend_bos=True)
    prompt = (prompt * args.prompt_tokens)[: args.prompt_tokens]
    engine = Engine(model, tokenizer, tools=False)
    engine.stop_ids = set()  # decode exactly new_tokens
    sampling = Sampling(temperature=0, max_tokens=args.new_tokens)
    cached_s, cached = timed(lambda: engine.complete(prompt, sampling)[0])
    full_s, full = timed(lambda: full_recompute(model, prompt, args.new_tokens))
    row = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": datetime.now(timezone.utc).isoformat(),
           "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
           f"({torch.get_num_threads()} threads)", "model": model.config.to_dict(), "prompt_tokens": len(prompt),
           "new_tokens": args.new_tokens, "cached_s": cached_s, "full_recompute_s": full_s,
           "cached_tokens_per_s": args.new_tokens / cached_s, "full_recompute_tokens_per_s": args.new_tokens / full_s,
           "speedup": full_s / cached_s, "same_tokens": cached == full}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_decode_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(f"KV cache {row['cached_tokens_per_s']:,.0f} tokens/s, full recomputation "
          f"{row['full_recompute_tokens_per_s']:,.0f} tokens/s: {row['speedup']:.1f}x; same tokens: "
          f"{row['same_tokens']} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
