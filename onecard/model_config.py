"""The shape of a GPT: its configuration, parameter counts and training FLOPs per token.

Plain arithmetic, no tensors: the planner sizes models with it without importing PyTorch.
See docs/architecture.md for the formulas and their sources.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from onecard import defaults
from onecard.errors import UsageError

HEAD_DIM = 128  # the depth dial fixes head_dim at 128 (nanochat: num_heads = ceil(model_dim / 128))
ASPECT_RATIO = 64  # n_embd = 64 * depth
MAX_DEPTH = 100  # d100 is ~50 B parameters, far past one card; a larger depth is a typo


@dataclass
class GPTConfig:
    sequence_len: int = defaults.SEQ_LEN
    vocab_size: int = defaults.VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"model {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UsageError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: "
                "no whole head size (with the depth dial: choose another depth)"
            )
        if self.n_head % self.n_kv_head:
            raise UsageError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise UsageError(f"head_dim {self.n_embd // self.n_head} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = defaults.VOCAB_SIZE,
                   sequence_len: int = defaults.SEQ_LEN) -> GPTConfig:
        """nanochat's depth dial: width 64·depth, heads of 128 channels."""
        if not isinstance(depth, int) or not 0 < depth <= MAX_DEPTH:
            raise UsageError(f"depth must be a whole number from 1 to {MAX_DEPTH}, got {depth!r}")
        n_embd = depth * ASPECT_RATIO
        n_head = max(1, -(-n_embd // HEAD_DIM))
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_head, n_embd=n_embd)

    def to_dict(self) -> dict:
        return asdict(self)


def depth_from(model: str | None, depth: int | None) -> int | None:
    """--model dN or --depth N (not both), range-checked; None when neither was given."""
    if model and depth:
        raise UsageError("give --model or --depth, not both")
    if model:
        return parse_model_name(model)
    if depth is not None and not 0 < depth <= MAX_DEPTH:
        raise UsageError(f"--depth must be a whole number from 1 to {MAX_DEPTH}, got {depth}")
    return depth


def parse_model_name(name: str) -> int:
    """'d32' -> 32. Anything else is a usage error that says what is accepted."""
    text = name.strip().lower()
    if text.startswith("d") and text[1:].isdigit() and 0 < int(text[1:]) <= MAX_DEPTH:
        return int(text[1:])
    raise UsageError(f"unknown model {name!r}: use dN with N a depth from 1 to {MAX_DEPTH}, e.g. d20 or d32 "
                     "(or --depth N)")


def param_counts(config: GPTConfig) -> dict[str, int]:
    """Parameters by group, from the shapes alone (no tensors made)."""
    d, v, layers = config.n_embd, config.vocab_size, config.n_layer
    kv = config.n_kv_head * config.head_dim
    attn = d * d * 2 + d * kv * 2  # c_q and c_proj are d x d, c_k and c_v are d x kv
    mlp = 2 * d * 4 * d
    return {"wte": v * d, "blocks": layers * (attn + mlp), "lm_head": v * d}


def flops_per_token(config: GPTConfig) -> int:
    """nanochat's training FLOPs per token: 6·N(non-embedding, lm_head included) + 12·L·H·Q·T."""
    counts = param_counts(config)
    non_embedding = counts["blocks"] + counts["lm_head"]
    attention = 12 * config.n_layer * config.n_head * config.head_dim * config.sequence_len
    return 6 * non_embedding + attention
