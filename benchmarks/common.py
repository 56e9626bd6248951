"""What every benchmark here records and builds: the commit measured, and the CPU demo's model shape."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commit() -> str:
    """git's HEAD, or ONECARD_COMMIT where the copy has no git (a lent machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ONECARD_COMMIT", "unknown")


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def demo_model(head_std: float = 0.0):
    """The CPU demo's shape (4 layers, width 128, context 128, vocabulary 2,048) with nanochat's init;
    head_std > 0 draws the head too (nanochat zeroes it, and then every logit ties)."""
    import torch

    from onecard.data import Corpus, iter_texts
    from onecard.model import GPTConfig, build_model
    from onecard.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter_texts(Corpus.embedded(), 300_000), 2048)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=2, n_kv_head=2,
                       n_embd=128)
    model = build_model(config)
    if head_std:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, head_std)
    return model, tokenizer
