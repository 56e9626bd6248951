"""The GPT onecard trains: nanochat's "classic" architecture, the one of the published d32.

Rotary embeddings (half-split layout), QK-norm, parameter-free RMSNorm, ReLU² MLP, untied
embedding and head, logits soft-capped at 15, no biases. Parameter names and shapes match
nanochat's state dict so that its checkpoints load as they are. The facts this relies on (shapes,
counts, FLOPs per token) and their public sources: docs/architecture.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onecard.errors import UsageError
from onecard.loss import chunked_cross_entropy, fused_cross_entropy, fused_loss_function
from onecard.model_config import GPTConfig, flops_per_token, param_counts, parse_model_name  # noqa: F401
from onecard.recipe import CHOICES, LOSS_CHUNK_ROWS

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10000


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weights, in x's dtype on every torch version. torch 2.12 put rms_norm on CUDA
    autocast's fp32 list (pytorch/pytorch#174824), which would turn the bf16 residual stream into
    fp32: twice its bytes kept for backward, and extra cast kernels (pytorch/pytorch#188955). It
    computes in fp32 inside either way; outside autocast it computes what torch <= 2.11 did, under
    which nanochat's published runs (torch 2.8) were made."""
    if x.device.type not in ("cuda", "cpu"):
        return F.rms_norm(x, (x.size(-1),))
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position; half-split layout: first half pairs with second half."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables shaped (1, seq_len, 1, head_dim/2), kept in bf16 as nanochat does."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROTARY_BASE ** (channels / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
    return cos[None, :, None, :], sin[None, :, None, :]


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (config.n_layer, batch, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self.prev_embedding: torch.Tensor | None = None  # nanochat-2026's smear: the last token's embedding

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + t} > {self.max_len} positions")
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        end = self.pos + t
        if layer == self.k.size(0) - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        gqa = self.n_head != self.n_kv_head
        t_q, t_k = q.size(2), k.size(2)
        if t_q == t_k:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif t_q == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: all of the prefix, causal within the chunk
            mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, recompute_mlp: bool = False):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        if recompute_mlp:  # keep only the MLP's input; its norm, c_fc, ReLU² and c_proj rerun in backward
            return x + recompute(self.mlp_branch, x)
        return x + self.mlp_branch(x)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(norm(x))


def recompute(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """Run fn keeping only its inputs; backward reruns it. No RNG state: the model has no randomness."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Tensors autograd saves go to CPU memory (pinned on CUDA machines) and come back for backward.

    Like torch.autograd.graph.save_on_cpu, except that saved parameters (and views of them) stay
    where they are: they are alive anyway, and copying every weight to the CPU each micro-batch
    would double the PCIe traffic for nothing. `offloaded_bytes` counts what went to the CPU.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        params = list(params)
        param_storages = {p.untyped_storage().data_ptr() for p in params}
        pin = any(p.is_cuda for p in params)  # pinned only where the copies cross to a card
        self.offloaded_bytes = 0

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() in param_storages:
                return t
            # the same strides where the tensor is dense: a compiled backward checks them
            host = torch.empty_like(t, device="cpu", pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            self.offloaded_bytes += host.numel() * host.element_size()
            return t.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin)

        super().__init__(pack, unpack)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables for 10x the training context, so sampling may run past it.
        self.rotary_len = config.sequence_len * 10
        cos, sin = rotary_tables(self.rotary_len, config.head_dim, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Memory policies (recipe.activations, recipe.loss); set_policies changes them.
        self.activations = "keep"
        self.loss = "full"
        self.loss_chunk_rows = LOSS_CHUNK_ROWS
        self.offloaded_bytes = 0  # bytes the latest offloading forward sent to the CPU
        # the blocks a training forward calls instead, compiled one by one (onecard.step.compiled)
        self.compiled_blocks: list | None = None

    def set_policies(self, activations: str = "keep", loss: str = "full",
                     loss_chunk_rows: int = LOSS_CHUNK_ROWS) -> None:
        """Choose how training spends activation and logits memory (see recipe.py).

        activations: keep | selective (each block's MLP and its pre-norm recomputed in backward) |
        full (each block recomputed; only block inputs kept) | offload (saved tensors to CPU).
        loss: full | chunked (loss_chunk_rows rows at a time) | fused (Liger, CUDA only).
        Recompute and offload apply only when autograd records (training); sampling is unchanged.
        """
        for key, value in (("activations", activations), ("loss", loss)):
            if value not in CHOICES[key]:
                raise UsageError(f"{key} policy {value!r} is not one of {', '.join(CHOICES[key])}")
        if loss_chunk_rows <= 0:
            raise UsageError(f"loss_chunk_rows must be positive, got {loss_chunk_rows}")
        if loss == "fused":
            fused_loss_function(self.lm_head.weight.device)  # fail now, not at the first step
        self.activations, self.loss, self.loss_chunk_rows = activations, loss, loss_chunk_rows

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: scaled normal for linears, unit normal for wte, zero for the outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.reset_rotary()

    @torch.no_grad()
    def reset_rotary(self) -> None:
        """Fill the rotary tables (made from the config: checkpoints do not hold them)."""
        cos, sin = rotary_tables(self.rotary_len, self.config.head_dim, device=self.lm_head.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The three groups the optimizers treat differently."""
        return {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": [self.transformer.wte.weight],
            "lm_head": [self.lm_head.weight],
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token, nanochat's formula: 6·N(non-embedding) + 12·L·H·Q·T."""
        return flops_per_token(self.config)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean"):
        hidden = self.trunk(idx, kv_cache)
        if targets is None:
            return self.logits(hidden)
        if self.loss == "chunked":
            return chunked_cross_entropy(self.logits, hidden, targets, loss_reduction, self.loss_chunk_rows)
        if self.loss == "fused":
            return fused_cross_entropy(hidden, self.head_weight(), targets, LOGIT_SOFTCAP, loss_reduction)
        logits = self.logits(hidden)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def head_weight(self) -> torch.Tensor:
        """The head's weight as the fused loss takes it (a family with a padded vocabulary trims it)."""
        return self.lm_head.weight

    def trunk(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Everything before the head: embedding, blocks, final norm. Returns (B, T, n_embd)."""
        T = idx.size(1)
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.rotary_len:
            raise ValueError(f"sequence of {start + T} positions exceeds the rotary table "
                             f"({self.rotary_len})")
        cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]
        training = torch.is_grad_enabled() and kv_cache is None
        policy = self.activations if training else "keep"
        offload = OffloadActivations(self.parameters()) if policy == "offload" else None
        with offload or nullcontext():
            x = norm(self.transformer.wte(idx))
            for block in self.compiled_blocks if training and self.compiled_blocks else self.transformer.h:
                if policy == "full":
                    x = recompute(block, x, cos, sin)
                else:
                    x = block(x, cos, sin, kv_cache, recompute_mlp=policy == "selective")
            x = norm(x)
        if offload is not None:
            self.offloaded_bytes = offload.offloaded_bytes
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)



def build_model(config: GPTConfig, device: str | torch.device = "cpu", init: bool = True) -> GPT:
    """Make the model on `device` with nanochat's init; meta device gives shapes only."""
    if config.arch != "classic":
        raise ValueError(f"{config.arch} models are built by onecard.family.build_model")
    return materialize(GPT, config, device, init)


def materialize(cls: type[GPT], config: GPTConfig, device: str | torch.device, init: bool) -> GPT:
    """Build `cls` on the meta device, then allocate it on `device`: initialized, or (init False,
    weights to come from a checkpoint) with only the rotary tables filled in."""
    with torch.device("meta"):
        model = cls(config)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        model.reset_rotary()
    return model
