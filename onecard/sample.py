"""`onecard sample`: continue a prompt with a trained model (an onecard run or a nanochat checkpoint)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onecard.args import ONE_DECODE_STEP, add_threads_argument, positive_int, seed, temperature, text_arg
from onecard.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", type=text_arg,
                   help="an onecard run directory or a nanochat checkpoint directory (default: the newest "
                        "finished `onecard train` run under ./runs)")
    p.add_argument("--run-dir", dest="run_dir_flag", type=text_arg, metavar="RUN_DIR",
                   help="the same, as a flag (as train's closing line writes it)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=temperature, default=0.8, help="0 for greedy, at most 2 (default 0.8)")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default 50)")
    p.add_argument("--seed", type=seed, default=0, help="default 0")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu, cuda or auto (default)")
    p.add_argument("--tokenizer", type=text_arg,
                   help="tokenizer.pkl or directory, for a nanochat checkpoint kept elsewhere")
    add_threads_argument(p, 1, "text is written one token at a time, and " + ONE_DECODE_STEP)


def run(args: argparse.Namespace) -> int:
    from onecard.device import resolve_device, use_threads
    from onecard.engine import sample_text
    from onecard.weights import load_weights

    run_dir = chosen_run(args.run_dir, args.run_dir_flag)
    device = resolve_device(args.device)
    use_threads(args.threads, device)
    model, tokenizer, _ = load_weights(run_dir, device, tokenizer_path=args.tokenizer)
    note = cut_note(len(tokenizer.encode(args.prompt, prepend_bos=True)), args.max_tokens, model.rotary_len)
    if note:  # the text printed still starts with the whole prompt: say what the model did not read
        print(note, file=sys.stderr)
    print(sample_text(model, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed))
    return 0


def chosen_run(given: str | None, flag: str | None) -> str | Path:
    """The run named as an argument or with --run-dir, else the newest finished pre-training run."""
    from onecard.run import newest_run

    if given and flag and given != flag:
        raise UsageError(f"two runs given ({given} and --run-dir {flag}): give one")
    if given or flag:
        return given or flag
    found = newest_run("pretrain")
    if found is None:
        raise UsageError("no finished `onecard train` run under ./runs: give the run directory "
                         "(onecard sample RUN_DIR)")
    return found


def cut_note(prompt_tokens: int, max_tokens: int, positions: int) -> str:
    """What sample_text leaves out where prompt and --max-tokens exceed the model's positions (it keeps
    the prompt's last tokens, leaving room for --max-tokens), or ''."""
    kept = min(prompt_tokens, max(1, positions - max_tokens))
    said = []
    if kept < prompt_tokens:
        said.append(f"the prompt's {prompt_tokens:,} tokens are cut to their last {kept:,}")
    if kept + max_tokens > positions:
        said.append(f"at most {positions - kept:,} tokens follow, not --max-tokens {max_tokens:,}")
    return f"note: the model reads at most {positions:,} positions: {' and '.join(said)}" if said else ""
