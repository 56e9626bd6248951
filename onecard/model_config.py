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

# The model families. "classic": nanochat fae3aca (October 2025, the published d32).
# "nanochat-2026": nanochat 92d63d4 (karpathy/nanochat, nanochat/gpt.py), the architecture of the
# 2026 "time to GPT-2" leaderboard; onecard/model_2026.py builds it, docs in its docstring.
ARCHS = ("classic", "nanochat-2026")
ARCH_2026 = "nanochat-2026"
VOCAB_2026 = 32_768  # nanochat 92d63d4 nanochat/gpt.py GPTConfig.vocab_size default
WINDOW_PATTERN_2026 = "SSSL"  # nanochat 92d63d4 nanochat/gpt.py GPTConfig.window_pattern default
PAD_VOCAB_TO = 64  # nanochat 92d63d4 nanochat/gpt.py GPT(pad_vocab_size_to=64)
WINDOW_TILE = 128  # short windows round up to this (nanochat 92d63d4 gpt.py _compute_window_sizes)
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels (nanochat 92d63d4 gpt.py)
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels (nanochat 92d63d4 gpt.py)


@dataclass
class GPTConfig:
    sequence_len: int = defaults.SEQ_LEN
    vocab_size: int = defaults.VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    arch: str = "classic"  # one of ARCHS
    window_pattern: str = WINDOW_PATTERN_2026  # nanochat-2026 only: S/L per layer, tiled, last layer L

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"model arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.arch == ARCH_2026:
            pattern = self.window_pattern  # from a config file: anything JSON holds
            if not isinstance(pattern, str) or not pattern or set(pattern.upper()) - set("SL"):
                raise UsageError(f"window_pattern {self.window_pattern!r} must be letters S and L, e.g. SSSL")
            if self.n_embd < SMEAR_CHANNELS:
                raise UsageError(f"nanochat-2026 needs n_embd >= {SMEAR_CHANNELS} (its smear gate), got "
                                 f"{self.n_embd}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
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

    @property
    def padded_vocab(self) -> int:
        """Rows of wte, lm_head and the value embeddings: nanochat-2026 pads to a multiple of 64."""
        if self.arch == "classic":
            return self.vocab_size
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = defaults.VOCAB_SIZE,
                   sequence_len: int = defaults.SEQ_LEN, arch: str = "classic") -> GPTConfig:
        """nanochat's depth dial: width 64·depth, heads of 128 channels. nanochat-2026 (base_train.py
        build_model_meta, karpathy/nanochat 00255c1) rounds the width up to a multiple of 128."""
        if not isinstance(depth, int) or not 0 < depth <= MAX_DEPTH:
            raise UsageError(f"depth must be a whole number from 1 to {MAX_DEPTH}, got {depth!r}")
        n_embd = depth * ASPECT_RATIO
        if arch == ARCH_2026:
            n_embd = -(-n_embd // HEAD_DIM) * HEAD_DIM
        n_head = max(1, -(-n_embd // HEAD_DIM))
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_head, n_embd=n_embd, arch=arch)

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.arch == "classic":  # the classic's files stay as they were before the field existed
            del out["arch"], out["window_pattern"]
        return out


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


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """nanochat-2026: value embeddings on alternating layers, the last one always included."""
    return layer % 2 == (n_layer - 1) % 2


def value_embedding_layers(config: GPTConfig) -> list[int]:
    if config.arch == "classic":
        return []
    return [i for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)]


def window_sizes(config: GPTConfig) -> list[int]:
    """Keys each layer's queries may look back (beyond themselves): the whole context for the
    classic and for 'L' layers, a quarter context rounded up to 128 for 'S' layers; the last
    layer is always 'L' (nanochat 92d63d4 gpt.py _compute_window_sizes)."""
    long = config.sequence_len
    if config.arch == "classic":
        return [long] * config.n_layer
    short = -(-long // 4 // WINDOW_TILE) * WINDOW_TILE
    pattern = config.window_pattern.upper()
    sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes


def param_counts(config: GPTConfig) -> dict[str, int]:
    """Parameters by group, from the shapes alone (no tensors made). "blocks" are the matrices
    Muon updates (nanochat-2026: with the value-embedding gates); nanochat-2026 adds
    "value_embeds" and "scalars" (per-layer lambdas, smear gate and lambda, backout lambda)."""
    d, v, layers = config.n_embd, config.padded_vocab, config.n_layer
    kv = config.n_kv_head * config.head_dim
    attn = d * d * 2 + d * kv * 2  # c_q and c_proj are d x d, c_k and c_v are d x kv
    mlp = 2 * d * 4 * d
    counts = {"wte": v * d, "blocks": layers * (attn + mlp), "lm_head": v * d}
    if config.arch != "classic":
        ve = len(value_embedding_layers(config))
        counts["blocks"] += ve * VE_GATE_CHANNELS * config.n_kv_head
        counts["value_embeds"] = ve * v * kv
        counts["scalars"] = 2 * layers + SMEAR_CHANNELS + 2
    return counts


def scaling_params(config: GPTConfig) -> int:
    """What nanochat-2026's tokens:params ratio counts: transformer matrices + lm_head
    (base_train.py get_scaling_params, karpathy/nanochat 00255c1); the classic counts all."""
    counts = param_counts(config)
    if config.arch == "classic":
        return sum(counts.values())
    return counts["blocks"] + counts["lm_head"]


def flops_per_token(config: GPTConfig) -> int:
    """nanochat's training FLOPs per token: 6·N(matmul weights, lm_head included) + 12·H·Q·T per
    layer, T capped at the layer's window (nanochat 92d63d4 gpt.py estimate_flops; for the classic
    every window is the context). nanochat-2026's smear gate (24 weights) is a matmul too."""
    counts = param_counts(config)
    matmul = counts["blocks"] + counts["lm_head"] + (SMEAR_CHANNELS if config.arch != "classic" else 0)
    t = config.sequence_len
    attention = sum(12 * config.n_head * config.head_dim * min(w, t) for w in window_sizes(config))
    return 6 * matmul + attention
