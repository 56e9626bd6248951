"""Bytes a training step holds on the card, by component, for a model x recipe (docs/memory.md).

Two numeric setups are modelled, because the tests and the planner see different ones:
- "bf16": bf16 autocast with an fp32 residual stream, as the trainer runs on CUDA (nanochat's
  way). Linear layers save bf16 copies of their inputs (one per layer: c_q, c_k and c_v each
  cast the same normed input), rms_norm saves its fp32 input, attention saves bf16 q, k, v and
  output. With fp32 parameters autocast also keeps a bf16 copy of every matrix it multiplies.
  This is what `plan` uses; the CPU tests check it under CPU autocast, which saves the same.
- "fp32": no autocast, everything fp32: what a plain CPU run saves, checked exactly in tests.

Every count below is per micro-batch of n = micro_batch x seq_len tokens. Parameters, gradients
and optimizer states are counted in onecard/plan/persistent.py.

Where CUDA may differ from what the CPU tests can check, the model takes the larger figure:
fp8 recipes are counted with bf16 activations (torchao may keep smaller fp8 casts); a fused CUDA
rms_norm saves its input once per call where the CPU composite saves it twice, which only changes
what offload copies out.

Compiled recipes (recipe.compile, the default on CUDA) save what torch.compile's partition of the
forward and backward keeps for backward, which differs from eager autograd: the residual stream in
bf16 (the embedding is bf16 on CUDA, the norm runs outside autocast), one bf16 copy of each normed
input, pointwise results recomputed, and for the full loss only the bf16 logits and two numbers per
row (the soft-cap, float cast and log-softmax are recomputed in the fused backward).
tests/test_plan_memory.py checks these counts against the partition inductor makes of onecard's
model (traced on the CPU with inductor's decompositions and min-cut partitioner, CUDA autocast's
casts made by hand); the whole step is checked against nanochat's published d20 peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onecard.model_config import SMEAR_CHANNELS, GPTConfig, value_embedding_layers
from onecard.plan.assumptions import DEFAULT, Assumptions
from onecard.plan.persistent import parameter_shapes, persistent_bytes
from onecard.recipe import LOSS_CHUNK_ROWS, Recipe

# ---------------------------------------------------------------- activations
#
# Per block, what autograd saves (n tokens, width d, kv = n_kv_head*head_dim, f = 4d, H heads):
#   rms_norm    its input and rsqrt (the input twice and rsqrt twice per save call: pow and mul)
#   linears     their input: c_q, c_k and c_v share one fp32 normed x, or, under autocast, each
#               saves its own bf16 cast of it
#   rotary      nothing large (mul by the tables saves the tables); two bf16 -sin tables per block
#   attention   q, k, v, output and the log-sum-exp; c_proj saves the output again (a view)
#   MLP         normed input, relu output (saved by relu and by square), square output
# "unique" counts each storage once (the memory it holds); "per save" counts every save call,
# which is what an offloading hook copies out (it copies each call separately).

def _block_bytes(config: GPTConfig, numerics: str) -> tuple[float, float, float]:
    """Per-token bytes of one block: (unique, per save call, of which the MLP part (unique))."""
    d, kv, f = config.n_embd, config.n_kv_head * config.head_dim, 4 * config.n_embd
    H, Hkv = config.n_head, config.n_kv_head
    rsqrt, lse = 4 * (2 + H + Hkv), 4 * H  # one fp32 rsqrt per row of each of the 4 norms
    if numerics == "fp32":
        # x, normed x, q and k after rotary, normed q and k, v, attention out, x after attention,
        # its normed copy, relu out, square out
        unique = 4 * (7 * d + 3 * kv + 2 * f) + rsqrt + lse
        per_save = 8 * (3 * d + kv) + 4 * (3 * d + d + 2 * kv + 2 * d + d + 3 * f) + 2 * rsqrt + lse
        mlp = 4 * (d + 2 * f) + 4
    else:
        # fp32: x, q and k after rotary (rms_norm upcasts), x after attention;
        # bf16: three casts of normed x, q, k, v, out, the MLP's normed-x cast, relu and square out
        unique = 4 * (3 * d + kv) + 2 * (6 * d + 2 * kv + 2 * f) + rsqrt + lse
        per_save = 8 * (3 * d + kv) + 2 * (3 * d + d + 2 * kv + 2 * d + d + 3 * f) + 2 * rsqrt + lse
        mlp = 2 * (d + 2 * f) + 4
    return unique, per_save, mlp


def _block_bytes_compiled(config: GPTConfig) -> tuple[float, float]:
    """Per-token bytes one block keeps for backward under torch.compile: (all, the MLP's part).

    bf16 (the residual stream is bf16: the embedding is, and onecard's norm runs outside autocast,
    see onecard.model.norm): the block's input and its middle (after attention), the normed input
    (one copy for c_q, c_k and c_v), q and k after rotary, q, k and v after the QK norm (attention's
    inputs), attention's output and its contiguous copy for c_proj, the MLP's normed input, c_fc's
    output and its square (c_proj's input). fp32 per row: the two block norms' and the per-head QK
    norms' rsqrt, and attention's log-sum-exp."""
    d, kv, f = config.n_embd, config.n_kv_head * config.head_dim, 4 * config.n_embd
    H, Hkv = config.n_head, config.n_kv_head
    mlp = 2 * (d + 2 * f) + 4
    return 2 * (8 * d + 3 * kv + 2 * f) + 4 * (2 + H + Hkv) + 4 * H, mlp


def _extra_2026(config: GPTConfig, numerics: str) -> float:
    """Per-token bytes nanochat-2026 saves per block beyond the classic's, eager (checked against
    autograd's saves in tests/test_plan_memory.py): the block's input before the resid/x0 mix
    (kept for the lambdas' gradients), and on value-embedding layers (counted at their share of
    layers) the looked-up embedding, the gate and the gated product."""
    kv = config.n_kv_head * config.head_dim
    b = 4 if numerics == "fp32" else 2
    share = len(value_embedding_layers(config)) / config.n_layer
    return 4 * config.n_embd + share * (2 * b * kv + 2 * 4 * config.n_kv_head)


def _weight_copies(config: GPTConfig, recipe: Recipe, autocast_copies: bool) -> tuple[int, int]:
    """Bytes of the bf16 copies autocast makes of fp32 matrices and the forward keeps: (the blocks',
    lm_head's). A checkpointed region (a recomputed block or MLP, a loss chunk) makes its copies
    again in backward and keeps none."""
    if not autocast_copies:
        return 0, 0
    matrices = sum(r * c for r, c in parameter_shapes(config)["blocks"])
    mlp = config.n_layer * 2 * 4 * config.n_embd ** 2
    kept = {"selective": matrices - mlp, "full": 0}.get(recipe.activations, matrices)
    head = config.padded_vocab * config.n_embd if recipe.loss == "full" else 0
    return 2 * kept, 2 * head


def _outside_blocks_2026(config: GPTConfig, recipe: Recipe, n: int, numerics: str) -> int:
    """What nanochat-2026 keeps outside its blocks when each block is recomputed: every layer's
    input before the resid/x0 mix (saved by the mix for the lambdas' gradients; layer 0's is x0),
    the value embeddings looked up for the value-embedding layers (the blocks' inputs, fp32 on the
    CPU), and the smear's shifted input and gate input."""
    d, kv, B = config.n_embd, config.n_kv_head * config.head_dim, recipe.micro_batch
    ve = 4 if numerics == "fp32" else 2  # the embeddings are bf16 on CUDA
    smear = 4 * n * d + 4 * (n - B) * (SMEAR_CHANNELS + 2)
    return config.n_layer * 4 * n * d + len(value_embedding_layers(config)) * ve * n * kv + smear


@dataclass(frozen=True)
class Activations:
    """What one micro-batch's forward leaves for backward, and the transients around it."""
    saved: int  # held by autograd at the end of forward (loss excluded): what the hooks measure
    weight_copies: int  # bf16 copies of fp32 matrices made by autocast (held through forward)
    recompute: int  # transient: a block re-run in backward, or the offload window
    working: int  # transient: gradient temporaries of one block's backward (an estimate)
    logits_saved: int  # saved by the loss: soft-capped logits, log-softmax, targets
    logits_peak: int  # the loss at its peak, gradients included
    host: int = 0  # bytes parked in host memory (offload)
    pcie_bytes: int = 0  # host<->device traffic per micro-batch (offload)
    detail: dict = field(default_factory=dict)

    @property
    def on_device(self) -> int:
        return self.saved + self.weight_copies + self.recompute + self.working


def activation_bytes(config: GPTConfig, recipe: Recipe, numerics: str = "bf16",
                     params_fp32: bool | None = None, compiled: bool | None = None) -> Activations:
    """Bytes autograd saves for one micro-batch under the recipe's activation policy and loss.

    keep      every block keeps all it saves
    selective each block keeps attention and the MLP's input; norm+MLP re-run in backward
    full      each block keeps only its input; the whole block re-runs in backward
    offload   everything the trunk saves (blocks and norms; not parameters) is copied to host
              memory at each save call and comes back in backward; the device holds about two
              blocks' worth at a time (one coming back, one in use)
    loss full: fp32 logits (bf16 soft-capped ones too under autocast); chunked: LOSS_CHUNK_ROWS
    rows at a time, re-run in backward; fused: Liger's kernel (logits chunks plus fp32 grads).
    compiled (default: the recipe's, under bf16, unless compiled block by block): what
    torch.compile keeps.
    """
    if compiled is None:
        # compiled block by block: counted as eager, an upper bound (a compiled block re-run in
        # backward keeps less than an eager one; the head and the loss run eagerly either way)
        compiled = recipe.compile and numerics == "bf16" and not recipe.compiles_per_block
    if params_fp32 is None:
        params_fp32 = recipe.params == "fp32"
    if compiled:
        return _compiled_activation_bytes(config, recipe, params_fp32)
    n, T, L, V, d = (recipe.micro_batch * recipe.seq_len, recipe.seq_len, config.n_layer,
                     config.padded_vocab, config.n_embd)
    unique, per_save, mlp_part = _block_bytes(config, numerics)
    if config.arch != "classic":
        extra = _extra_2026(config, numerics)
        unique, per_save = unique + extra, per_save + extra
    sin = 2 * T * config.head_dim  # -sin is made (bf16) for q and for k in every block
    keep_block = int(n * unique) + sin
    save_block = int(n * per_save) + sin
    mlp = int(n * mlp_part)
    b = 4 if numerics == "fp32" else 2
    policy = recipe.activations
    block_copies, head_copy = _weight_copies(config, recipe, numerics == "bf16" and params_fp32)

    trunk = 8 * n + 4 * n * (d + 1)  # token ids; the fp32 embedding output and its rsqrt
    final = 4 * n * (d + 1)  # the final norm's input and rsqrt
    targets = 8 * n + 4  # int64 targets and nll_loss's total_weight
    # nanochat-2026 soft-caps after the float cast: its logits are fp32 throughout, as without autocast
    fp32_logits = numerics == "fp32" or config.arch != "classic"
    cap = 16 if fp32_logits else 14  # bytes per logit at the loss's peak
    if recipe.loss == "full":
        head = b * n * d  # lm_head's input (a bf16 cast under autocast)
        logits_saved = (8 if fp32_logits else 6) * n * V + targets  # soft-capped, log-softmax
        logits_peak = cap * n * V + targets  # + the log-softmax's and the logits' gradients
    else:
        head = 4 * n * d  # the chunks' input, re-run chunk by chunk in backward
        logits_saved = targets
        logits_peak = _chunked_loss_peak(config, recipe, n, cap) + targets

    recompute, host, pcie = 0, 0, 0
    copies = block_copies + head_copy
    if policy == "keep":
        blocks = L * keep_block
    elif policy == "selective":
        blocks = L * (keep_block - mlp)
        recompute = mlp
    elif policy == "full":
        blocks = L * 4 * n * d  # each block's fp32 input
        if config.arch != "classic":
            blocks += _outside_blocks_2026(config, recipe, n, numerics)
        recompute = keep_block
    else:  # offload: the trunk's saves go out, per save call, weight copies included
        host = L * save_block + block_copies + 8 * n + 2 * 4 * n * (d + 1) + 2 * final
        blocks, trunk, final, copies = 0, 0, 0, head_copy
        recompute = 2 * save_block
        pcie = 2 * host  # out during forward, back during backward
    f = 4 * d
    working = n * (2 * b * f + 2 * 4 * d)  # two MLP-sized grads and two fp32 residual grads alive
    return Activations(saved=blocks + trunk + final + head, weight_copies=copies, recompute=recompute,
                       working=working, logits_saved=logits_saved, logits_peak=logits_peak,
                       host=host, pcie_bytes=pcie,
                       detail={"blocks": blocks, "trunk": trunk, "final_norm": final, "head": head,
                               "per_block_keep": keep_block, "per_block_saves": save_block})


def _chunked_loss_peak(config: GPTConfig, recipe: Recipe, n: int, bytes_per_logit: int) -> int:
    """The chunked or fused loss at its peak: one chunk's logits with their gradients, and for the
    fused kernel the fp32 gradients of the hidden states and of lm_head it holds."""
    V, d = config.padded_vocab, config.n_embd
    peak = bytes_per_logit * min(LOSS_CHUNK_ROWS, n) * V
    if recipe.loss == "fused":
        peak += 4 * n * d + 4 * V * d
    return peak


def _compiled_activation_bytes(config: GPTConfig, recipe: Recipe, params_fp32: bool) -> Activations:
    """activation_bytes under torch.compile with bf16 autocast (see the module docstring).

    Counted as inductor's partition keeps them: block 0's input is the embedding itself; a
    checkpointed region (a recomputed block or MLP, a loss chunk) keeps neither its bf16 weight
    copies nor inputs that can be recomputed from what is kept (the final norm's output under a
    chunked loss, the last block's output under full recompute)."""
    n, T, L, V, d = (recipe.micro_batch * recipe.seq_len, recipe.seq_len, config.n_layer,
                     config.padded_vocab, config.n_embd)
    per_block, mlp_part = _block_bytes_compiled(config)
    keep_block = int(n * per_block)
    mlp = int(n * mlp_part)
    policy, full_loss = recipe.activations, recipe.loss == "full"
    copies = sum(_weight_copies(config, recipe, params_fp32))

    trunk = 8 * n + 2 * n * d + 4 * n + T * config.head_dim  # ids; bf16 embedding and rsqrt; -sin
    input_size = 2 * n * d  # a block's bf16 input (block 0's is the embedding, counted above)
    recompute = 0
    if policy == "keep":
        blocks = L * keep_block - input_size
    elif policy == "selective":
        blocks = L * (keep_block - mlp) - input_size
        recompute = mlp
    else:  # full: each block's bf16 input
        blocks = (L - 1) * input_size
        recompute = keep_block
    if config.arch != "classic":  # the partition recomputes the x0 mix; it keeps the value
        # embeddings looked up (bf16) and the smear's gate input, and x0 unless blocks are re-run
        kv, B = config.n_kv_head * config.head_dim, recipe.micro_batch
        blocks += len(value_embedding_layers(config)) * 2 * n * kv + 2 * (n - B) * (SMEAR_CHANNELS + 1)
        blocks += 0 if policy == "full" else input_size
    final = (0 if policy == "full" else input_size) + 4 * n  # the final norm's input and rsqrt
    head = 2 * n * d if full_loss else 0  # lm_head's bf16 input
    targets = 8 * n + 4
    if full_loss:  # bf16 logits and each row's max and log-sum-exp; backward's fused kernel then
        logits_saved = 2 * n * V + 8 * n + targets  # makes their bf16 gradient
        logits_peak = logits_saved + 2 * n * V
    else:  # chunked and fused: one chunk's logits at a time, as in eager mode
        logits_saved, logits_peak = targets, _chunked_loss_peak(config, recipe, n, 14) + targets
    working = n * (2 * 2 * 4 * d + 2 * 2 * d)  # two MLP-sized and two residual bf16 grads alive
    return Activations(saved=blocks + trunk + final + head, weight_copies=copies, recompute=recompute,
                       working=working, logits_saved=logits_saved, logits_peak=logits_peak,
                       detail={"blocks": blocks, "trunk": trunk, "final_norm": final, "head": head,
                               "per_block_keep": keep_block, "per_block_saves": keep_block})


# ---------------------------------------------------------------- the whole step

@dataclass(frozen=True)
class Memory:
    """Peak device memory of a training step, by component, plus what lives in host RAM."""
    weights: int
    grads: int
    optimizer: int
    activations: int  # saved, weight copies and block_backward
    block_backward: int  # one block's backward (re-run, temporaries) beyond the loss's peak (offload: all)
    logits: int
    buffers: int
    context: int
    workspace: int
    fragmentation: int
    host: int
    activation_detail: Activations

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should report at the step's peak."""
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.buffers)

    @property
    def other(self) -> int:
        return self.buffers + self.context + self.workspace + self.fragmentation

    @property
    def total(self) -> int:
        return self.allocated + self.context + self.workspace + self.fragmentation

    def components(self) -> dict[str, int]:
        """The JSON contract's memory object."""
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "other": self.other,
                "total": self.total}


def predict_memory(config: GPTConfig, recipe: Recipe, assume: Assumptions = DEFAULT,
                   micro_steps: int = 2, shards: int = 1) -> Memory:
    """Peak CUDA memory of one card (one data-parallel rank of `shards`) training `config` with
    `recipe`. With several cards each holds the whole model and its gradient buffers (averaged in
    place, with no bucketed second copy as DDP keeps) and its share of the optimizer states: the
    card owning the most is counted.

    The peak is at the start of backward: parameters, gradients (accumulated from the previous
    micro-batch) and optimizer states, everything the forward saved, the loss at its peak, plus
    what one block's backward adds (its re-run and temporaries) where that exceeds the loss's peak:
    the loss's backward frees its logits and their gradient before any block's backward begins
    (docs/memory.md#the-step). With activation offload the window of copies in flight may overlap
    the loss, and both are counted. With one
    micro-batch per optimizer step (`micro_steps` 1) no gradient exists yet at that point: they
    are made as backward frees the activations, and the peak is the larger of the two.
    """
    p = persistent_bytes(config, recipe, "cuda", shards)
    a = activation_bytes(config, recipe, "bf16")
    block_backward = a.recompute + a.working
    if recipe.activations != "offload":  # the loss's backward frees its logits and their gradient
        # before the last block's backward re-runs it or makes temporaries: the peaks come apart
        block_backward = max(0, block_backward - a.logits_peak)
    activations = a.saved + a.weight_copies + block_backward
    grads = p.grads + p.grad_transient
    if micro_steps == 1:
        grads = max(0, grads - activations - a.logits_peak)
    buffers = 2 * 2 * (10 * recipe.seq_len) * (config.head_dim // 2)  # rotary cos/sin tables, bf16
    allocated = p.weights + grads + p.optimizer + activations + a.logits_peak + buffers
    return Memory(weights=p.weights, grads=grads, optimizer=p.optimizer, activations=activations,
                  block_backward=block_backward, logits=a.logits_peak, buffers=buffers,
                  context=assume.cuda_context_bytes, workspace=assume.workspace_bytes,
                  fragmentation=int(assume.fragmentation * allocated),
                  host=p.host_weights + p.host_grads + p.host_optimizer + a.host,
                  activation_detail=a)
