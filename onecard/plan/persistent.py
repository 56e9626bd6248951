"""Bytes that live for the whole run: parameters, gradients and optimizer states, on the card
and in host RAM, for a model x recipe, exactly as onecard/optim.py and onecard/slots.py lay them
out (docs/memory.md#formats); with several ranks, on the rank that owns the most optimizer states.
The step's transient bytes (activations, logits, the peak) are onecard/plan/memory.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.model_config import SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig, value_embedding_layers
from onecard.recipe import INT8_BLOCK, Recipe, shard_owners, state_elements

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
BLOCK_MATRICES = 6  # c_q, c_k, c_v, the attention's c_proj, the MLP's c_fc and c_proj


def parameter_shapes(config: GPTConfig) -> dict[str, list[tuple[int, int]]]:
    """Every parameter's shape, by the group that decides its optimizer (see GPT.parameter_groups)."""
    d, kv, v = config.n_embd, config.n_kv_head * config.head_dim, config.padded_vocab
    block = [(config.n_head * config.head_dim, d), (kv, d), (kv, d), (d, d), (4 * d, d), (d, 4 * d)]
    shapes = {"blocks": block * config.n_layer, "wte": [(v, d)], "lm_head": [(v, d)]}
    if config.arch != "classic":  # nanochat-2026: value embeddings (AdamW) and their gates (Muon)
        ve = len(value_embedding_layers(config))
        shapes["blocks"] += [(config.n_kv_head, VE_GATE_CHANNELS)] * ve
        shapes["value_embeds"] = [(v, kv)] * ve
        L = config.n_layer
        shapes["scalars"] = [(L, 1), (L, 1), (1, SMEAR_CHANNELS), (1, 1), (1, 1)]
    return shapes


def state_bytes(numel: int, fmt: str) -> int:
    """One optimizer state tensor of `numel` elements in format fp32 | bf16 | int8."""
    if fmt == "int8":  # 1 byte each plus one fp32 scale per block, the last block short
        return numel + 4 * -(-numel // INT8_BLOCK)
    return numel * DTYPE_BYTES[fmt]


def parameter_dtypes(recipe: Recipe, device: str) -> dict[str, str]:
    """dtype of the parameters the model computes with, per group."""
    if recipe.params == "fp32":
        # nanochat keeps the embeddings in bf16 on CUDA; on the CPU everything stays fp32
        emb = "bf16" if device == "cuda" else "fp32"
        return {"blocks": "fp32", "lm_head": "fp32", "scalars": "fp32", "wte": emb, "value_embeds": emb}
    return dict.fromkeys(("blocks", "wte", "lm_head", "value_embeds", "scalars"), "bf16")  # bf16_sr, cpu_master


@dataclass(frozen=True)
class Persistent:
    """Bytes that live for the whole run, on the model's device and in host RAM (the recipe's
    split, as onecard.optim.Optimizers.state_bytes reports it)."""
    weights: int
    grads: int
    optimizer: int
    host_weights: int = 0
    host_grads: int = 0
    host_optimizer: int = 0
    grad_transient: int = 0  # a .grad on its way into a buffer of another dtype or place


def persistent_bytes(config: GPTConfig, recipe: Recipe, device: str = "cuda", shards: int = 1) -> Persistent:
    """Parameters, gradients and optimizer states, exactly as onecard.optim lays them out; with
    `shards` ranks, on the rank that owns the most optimizer states (recipe.shard_owners).

    Weights: each parameter in its dtype, plus an fp32 master copy in host RAM for cpu_master.
    Gradients: autograd's .grad where the recipe's gradient dtype is the weight's; otherwise a
    buffer in the recipe's dtype (fp32 in host RAM for grads=cpu) that a hook folds each .grad
    into as soon as it exists. In flight at once: one parameter's .grad eagerly; one block's, or
    one parameter's outside the blocks, compiled block by block; every hooked one compiled whole,
    whose backward hands all gradients over together (onecard.step.compiled).
    States: Muon's momentum per block matrix, AdamW's two moments per wte and lm_head, in the
    recipe's format, where optim_place says.
    """
    shapes = parameter_shapes(config)
    pdt = parameter_dtypes(recipe, device)
    weights = grads = host_grads = 0
    hooked: dict[str, list[int]] = {}  # bytes of each .grad that a hook folds away, by group
    for group, group_shapes in shapes.items():
        pbytes = DTYPE_BYTES[pdt[group]]
        for r, c in group_shapes:
            weights += r * c * pbytes
            if recipe.grads == pdt[group]:
                grads += r * c * pbytes
                continue
            hooked.setdefault(group, []).append(r * c * pbytes)
            if recipe.grads == "cpu":
                host_grads += 4 * r * c
            else:
                grads += r * c * DTYPE_BYTES[recipe.grads]
    host_weights, states = _owned_bytes(config, recipe, shapes, shards)
    on_cpu = recipe.optim_place == "cpu"
    return Persistent(weights, grads, 0 if on_cpu else states, host_weights, host_grads,
                      states if on_cpu else 0, _in_flight(hooked, recipe, config.n_layer))


def _in_flight(hooked: dict[str, list[int]], recipe: Recipe, n_layer: int) -> int:
    """The most bytes of hooked .grads alive at once (see persistent_bytes)."""
    every = [b for group in hooked.values() for b in group]
    if not recipe.compile or not every:
        return max(every, default=0)
    if not recipe.compiles_per_block:
        return sum(every)
    blocks = hooked.get("blocks", [])  # each block's matrices in turn, then the value-embedding gates
    one_block = sum(blocks[:BLOCK_MATRICES]) + max(blocks[BLOCK_MATRICES * n_layer:], default=0)
    return max([one_block, *(b for group, sizes in hooked.items() if group != "blocks" for b in sizes)])


def _owned_bytes(config: GPTConfig, recipe: Recipe, shapes: dict[str, list[tuple[int, int]]],
                 shards: int) -> tuple[int, int]:
    """The fp32 master copies (cpu_master) and optimizer states held by the rank with the most."""
    fmt, master = recipe.optim_states, recipe.params == "cpu_master"
    each = []  # (state elements, master bytes, state bytes) per parameter
    for group, group_shapes in shapes.items():
        for r, c in group_shapes:
            if group == "blocks":  # Muon's momentum; nanochat-2026: NorMuon's factored second moment
                held = state_bytes(r * c, fmt) + (4 * max(r, c) if config.arch != "classic" else 0)
            else:  # AdamW's two moments
                held = 2 * state_bytes(r * c, fmt)
            each.append((state_elements(r * c, group == "blocks"), 4 * r * c * master, held))
    owners = shard_owners([elements for elements, _, _ in each], shards)
    per_rank = [(0, 0)] * shards
    for owner, (_, master_bytes, held) in zip(owners, each, strict=True):
        per_rank[owner] = (per_rank[owner][0] + master_bytes, per_rank[owner][1] + held)
    return max(per_rank, key=lambda pair: pair[0] + pair[1])


def checkpoint_bytes(config: GPTConfig, recipe: Recipe, device: str = "cuda") -> int:
    """About what one checkpoint holds on disk: the weights as the model keeps them (and the fp32
    master copy of cpu_master) and the optimizer states, wherever they live."""
    p = persistent_bytes(config, recipe, device)
    return p.weights + p.host_weights + p.optimizer + p.host_optimizer
