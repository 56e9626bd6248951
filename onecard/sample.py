"""`onecard sample`: continue a prompt with a trained model (an onecard run or a nanochat checkpoint)."""

from __future__ import annotations

import argparse

from onecard.args import ONE_DECODE_STEP, add_threads_argument, positive_int, seed, temperature, text_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, type=text_arg,
                   help="an onecard run directory or a nanochat checkpoint directory")
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

    device = resolve_device(args.device)
    use_threads(args.threads, device)
    model, tokenizer, _ = load_weights(args.run_dir, device, tokenizer_path=args.tokenizer)
    print(sample_text(model, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed))
    return 0
