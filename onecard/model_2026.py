"""nanochat's current architecture ("nanochat-2026", karpathy/nanochat 92d63d4 nanochat/gpt.py), the
second model family: the one of the 2026 "time to GPT-2" leaderboard runs.

What it adds to the classic (onecard/model.py): a vocabulary padded to a multiple of 64; value
embeddings (ResFormer) on alternating layers, the last included, mixed into v by a per-head gate
3·sigmoid(W·x[:12]); per-layer scalars x <- resid_lambda·x + x0_lambda·x0 before every block;
smear (the previous token's normed embedding, gated, added to each position) and backout (half
the residual at the middle layer subtracted before the final norm); sliding-window attention by
a layer pattern (SSSL: quarter-context windows, the last layer full); rotary base 100,000; q and k
scaled by 1.2 after QK-norm; logits soft-capped at 15 in fp32. Parameter names and shapes equal
nanochat's, so its checkpoints load; tests/test_model_2026.py proves logits, initialization,
counts and FLOPs against nanochat's own code.

Attention with a window: on CUDA in training, FlexAttention with a sliding-window block mask
(compiled: only the blocks inside the window are computed); elsewhere SDPA with an explicit
boolean mask (the CPU, and KV-cache decoding). Both are tested equal to full attention with the
window mask written out.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from onecard.model import GPT, MLP, KVCache, OffloadActivations, apply_rotary, materialize, norm, recompute
from onecard.model_config import (
    SMEAR_CHANNELS,
    VE_GATE_CHANNELS,
    GPTConfig,
    has_value_embedding,
    window_sizes,
)

ROTARY_BASE = 100_000  # nanochat 92d63d4 gpt.py _precompute_rotary_embeddings(base=100000)
QK_SCALE = 1.2  # q and k multiplied after QK-norm (nanochat 92d63d4 gpt.py CausalSelfAttention)
VE_GATE_RANGE = 3.0  # gate = 3·sigmoid(...), in (0, 3) (nanochat 92d63d4 gpt.py)
LOGIT_SOFTCAP = 15.0  # nanochat 92d63d4 gpt.py forward
# Initialization (nanochat 92d63d4 gpt.py init_weights)
WTE_STD, LM_HEAD_STD, FC_SCALE, GATE_INIT, BACKOUT_INIT = 0.8, 0.001, 0.4, 0.02, 0.2


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """nanochat's COMPUTE_DTYPE: bf16 on CUDA (sm80+), fp32 on the CPU (nanochat 92d63d4 common.py)."""
    if torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def rotary_tables_2026(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (1, seq_len, 1, head_dim/2) at base 100,000, in the compute dtype."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROTARY_BASE ** (channels / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    dtype = compute_dtype(device or "cpu")
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def window_mask(t_q: int, t_k: int, window: int, device=None) -> torch.Tensor:
    """(t_q, t_k) bool: the queries are the last t_q of t_k positions; query i sees key j when
    j <= i and i - j <= window (window+1 keys, itself included: FlashAttention's window_size)."""
    row = (t_k - t_q) + torch.arange(t_q, device=device)[:, None]
    col = torch.arange(t_k, device=device)[None, :]
    return (col <= row) & (row - col <= window)


def sdpa_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention over (B, H, T, D) with a sliding window, by SDPA (a mask only where needed)."""
    t_q, t_k = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if t_q == t_k and window >= t_k - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t_q == 1:  # decoding: the last window+1 keys, no mask
        start = max(0, t_k - (window + 1))
        return F.scaled_dot_product_attention(q, k[:, :, start:], v[:, :, start:], enable_gqa=gqa)
    mask = window_mask(t_q, t_k, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@lru_cache(maxsize=16)
def _block_mask(t: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(_b, _h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(sliding, B=None, H=None, Q_LEN=t, KV_LEN=t, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # torch's default dynamic: static for one sequence length (pre-training), a dynamic kernel once a
    # second length comes (SFT's padded batches); dynamic=False recompiled for every length until
    # Dynamo's recompile limit, then ran flex eagerly, which materializes the whole score matrix
    return torch.compile(flex_attention)


def flex_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, compiled: bool = True
                ) -> torch.Tensor:
    """The same attention by FlexAttention: blocks wholly outside the window are skipped."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = _block_mask(q.size(2), window, str(q.device))
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=mask, enable_gqa=q.size(1) != k.size(1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, cached: bool) -> torch.Tensor:
    t = q.size(2)
    if q.is_cuda and not cached and window < t - 1 and torch.is_grad_enabled():
        return flex_window(q, k, v, window)
    return sdpa_window(q, k, v, window)


class CausalSelfAttention2026(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, config.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if ve else None

    def forward(self, x, ve, cos, sin, window: int, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a per-head, input-dependent share of the value embedding
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        y = attention(q, k, v, window, kv_cache is not None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class Block2026(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention2026(config, layer_idx)
        self.mlp = MLP(config)  # the classic's ReLU² MLP

    def forward(self, x, ve, cos, sin, window: int, kv_cache: KVCache | None = None,
                recompute_mlp: bool = False):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        if recompute_mlp:
            return x + recompute(self.mlp_branch, x)
        return x + self.mlp_branch(x)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(norm(x))


class GPT2026(GPT):
    """The nanochat-2026 model, with the classic's interface (trunk, logits, policies, groups)."""

    def __init__(self, config: GPTConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        vp, d = config.padded_vocab, config.n_embd
        kv = config.n_kv_head * config.head_dim
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vp, d),
            "h": nn.ModuleList([Block2026(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(d, vp, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_INIT))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vp, kv) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        self.rotary_len = config.sequence_len * 10
        cos, sin = rotary_tables_2026(self.rotary_len, config.head_dim, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.activations, self.loss, self.loss_chunk_rows = "keep", "full", 1024
        self.offloaded_bytes = 0
        self.compiled_blocks: list | None = None  # see GPT: compiled one by one for training

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat 92d63d4's init, drawn in its order (same seed -> same weights): uniform with
        the std of N(0, 1/d) for q, k, v and the value embeddings, 0.4x that for c_fc, zeros for
        the output projections, small positive gates, depth-graded residual and x0 scalars."""
        nn.init.normal_(self.transformer.wte.weight, 0.0, WTE_STD)
        nn.init.normal_(self.lm_head.weight, 0.0, LM_HEAD_STD)
        s = 3 ** 0.5 * self.config.n_embd ** -0.5
        for block in self.transformer.h:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight):
                nn.init.uniform_(w, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -s * FC_SCALE, s * FC_SCALE)
            nn.init.zeros_(block.mlp.c_proj.weight)
        n = self.config.n_layer  # in Python floats, then stored: as nanochat computes them
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * i / max(n - 1, 1) for i in range(n)]))
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * i / max(n - 1, 1) for i in range(n)]))
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, BACKOUT_INIT)
        nn.init.uniform_(self.smear_gate.weight, 0.0, GATE_INIT)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, GATE_INIT)
        self.reset_rotary()

    def reset_rotary(self) -> None:
        cos, sin = rotary_tables_2026(self.rotary_len, self.config.head_dim, device=self.lm_head.weight.device)
        self.cos, self.sin = cos, sin

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """nanochat 92d63d4's optimizer groups (gpt.py setup_optimizer)."""
        return {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": [self.transformer.wte.weight],
            "lm_head": [self.lm_head.weight],
            "value_embeds": list(self.value_embeds.parameters()),
            "resid": [self.resid_lambdas],
            "x0": [self.x0_lambdas],
            "smear": [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
        }

    def bf16_on_cuda(self) -> list[nn.Parameter]:
        """Kept in bf16 on CUDA even with fp32 weights, as nanochat stores them (init_weights)."""
        return [self.transformer.wte.weight, *self.value_embeds.parameters()]

    def head_weight(self) -> torch.Tensor:
        """The head's rows of real tokens: the padding rows never score (the fused loss takes them)."""
        return self.lm_head.weight[:self.config.vocab_size]

    def smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Add each position's gated previous-token embedding; a decode step takes it from the cache."""
        previous = None
        if kv_cache is not None:
            previous = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:, :]
        lam = self.smear_lambda.to(x.dtype)
        if x.size(1) > 1:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        if previous is not None:
            gate = lam * torch.sigmoid(self.smear_gate(x[:, :, :SMEAR_CHANNELS]))
            return x + gate * previous.to(x.dtype)
        return x

    def trunk(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        T = idx.size(1)
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.rotary_len:
            raise ValueError(f"sequence of {start + T} positions exceeds the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]
        training = torch.is_grad_enabled() and kv_cache is None
        policy = self.activations if training else "keep"
        offload = OffloadActivations(self.parameters()) if policy == "offload" else None
        middle = self.config.n_layer // 2  # backout caches the residual after this layer
        with offload or nullcontext():
            x = self.smear(norm(self.transformer.wte(idx)), kv_cache)
            x0, x_middle = x, None
            blocks = self.compiled_blocks if training and self.compiled_blocks else self.transformer.h
            for i, block in enumerate(blocks):
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
                ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
                window = self.window_sizes[i]
                if policy == "full":
                    x = recompute(block, x, ve, cos, sin, window)
                else:
                    x = block(x, ve, cos, sin, window, kv_cache, recompute_mlp=policy == "selective")
                if i == middle:
                    x_middle = x
            x = norm(x - self.backout_lambda.to(x.dtype) * x_middle)
        if offload is not None:
            self.offloaded_bytes = offload.offloaded_bytes
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)[..., :self.config.vocab_size].float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


def build_model_2026(config: GPTConfig, device: str | torch.device = "cpu", init: bool = True) -> GPT2026:
    return materialize(GPT2026, config, device, init)
