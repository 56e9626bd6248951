"""How long a recipe takes: FLOPs the step really executes, at a modelled utilization, plus
the time of bytes that cross PCIe and of the optimizer, then energy and cost (docs/time.md).

time per optimizer step = GPU compute (model FLOPs + recompute, bf16 and fp8 parts at their own
peaks) + optimizer (Newton-Schulz FLOPs, the elementwise update's memory traffic) + PCIe
transfers not hidden behind compute + the data-parallel exchange not hidden behind backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard import defaults
from onecard.model_config import GPTConfig, flops_per_token, param_counts, window_sizes
from onecard.plan.assumptions import DEFAULT, Assumptions
from onecard.plan.catalog import GPU
from onecard.plan.persistent import DTYPE_BYTES, parameter_dtypes, parameter_shapes, persistent_bytes
from onecard.recipe import Recipe

NS_STEPS = 5  # Newton-Schulz iterations per Muon update (nanochat)


def default_utilization(gpu: GPU, config: GPTConfig, compiled: bool,
                        assume: Assumptions = DEFAULT) -> tuple[float, str]:
    """The share of the bf16 peak a large micro-batch's FLOPs reach on this card, and why
    (docs/time.md#utilization): matmul_ceiling x d / (d + overhead_width x FLOPs per byte)."""
    width = assume.compiled_overhead_width if compiled else assume.eager_overhead_width
    flops_per_byte = gpu.peak_bf16 / gpu.memory_bandwidth
    d = config.n_embd
    u = assume.matmul_ceiling * d / (d + width * flops_per_byte)
    mode = "compiled" if compiled else "eager"
    why = (f"{mode} model at width {d} on a card with {flops_per_byte:.0f} FLOPs per byte of bandwidth, "
           "fitted to measured H200 runs and published nanochat runs (docs/time.md#utilization)")
    if gpu.kind == "laptop":
        u *= assume.laptop_clock_factor
        why += f"; x{assume.laptop_clock_factor:g} for a laptop's power-limited clock"
    return u, why


def layer_overhead_s(config: GPTConfig, recipe: Recipe, assume: Assumptions = DEFAULT) -> float:
    """Fixed time of one micro-batch's pass through the layers beyond its FLOPs. Eager fp8 pays it
    over again in the casts and scalings around every fp8 matrix multiply, as slowly as its FLOPs."""
    if recipe.compile:
        return config.n_layer * assume.compiled_layer_overhead_s
    per_layer = assume.eager_layer_overhead_s
    if recipe.matmul == "fp8":
        per_layer /= assume.fp8_eager_efficiency
    return config.n_layer * per_layer


def recompute_flops_per_token(config: GPTConfig, recipe: Recipe) -> int:
    """Forward FLOPs re-run in backward per token: the price of not keeping activations."""
    d, L = config.n_embd, config.n_layer
    extra = 0
    if recipe.activations == "full":  # every block's forward again, attention included
        t = config.sequence_len  # attention over each layer's window (the whole context for the classic)
        extra += 2 * param_counts(config)["blocks"] + sum(4 * config.n_head * config.head_dim * min(w, t)
                                                          for w in window_sizes(config))
    elif recipe.activations == "selective":  # every MLP's forward again
        extra += 2 * L * 8 * d * d
    if recipe.loss == "chunked":  # the head's forward again, chunk by chunk
        extra += 2 * config.vocab_size * d
    return extra


def fp8_flops_per_token(config: GPTConfig, recipe: Recipe) -> int:
    """FLOPs of the block linears (forward, both backward GEMMs, and their recompute) run in fp8."""
    if recipe.matmul != "fp8":
        return 0
    d, L, blocks = config.n_embd, config.n_layer, param_counts(config)["blocks"]
    fp8 = 6 * blocks
    if recipe.activations == "full":
        fp8 += 2 * blocks
    elif recipe.activations == "selective":
        fp8 += 2 * L * 8 * d * d
    return fp8


def backward_share(config: GPTConfig, recipe: Recipe) -> float:
    """Share of a micro-batch's hardware FLOPs spent after its forward pass (backward + recompute)."""
    forward = flops_per_token(config) / 3
    return 1 - forward / (flops_per_token(config) + recompute_flops_per_token(config, recipe))


def newton_schulz_flops(config: GPTConfig) -> int:
    """Muon's orthogonalization per step: 5 x (X X^T, A A, B X) on every block matrix."""
    total = 0
    for r, c in parameter_shapes(config)["blocks"]:
        m, n = min(r, c), max(r, c)
        total += NS_STEPS * (4 * m * m * n + 2 * m ** 3)
    return total


@dataclass(frozen=True)
class Timing:
    utilization: float
    utilization_source: str
    model_flops_per_token: int
    hardware_flops_per_token: int  # model + recompute
    fp8_flops_per_token: int  # part of hardware FLOPs run in fp8
    optimizer_flops_per_step: int
    micro_steps: int  # micro-batches per optimizer step on each GPU
    compute_s: float  # per optimizer step
    optimizer_s: float
    pcie_bytes: float  # per optimizer step
    pcie_s: float  # exposed part
    comm_s: float  # exposed part of the data-parallel exchange
    step_s: float
    grad_fold_s: float  # CPU time folding gradients into CPU RAM (grads=cpu), per optimizer step
    tokens_per_s: float
    mfu: float  # model FLOPs per second / (bf16 peak x GPUs)


def predict_time(config: GPTConfig, recipe: Recipe, gpu: GPU, gpus: int = 1, total_batch: int = defaults.TOTAL_BATCH,
                 utilization: float | None = None, source: str = "", assume: Assumptions = DEFAULT,
                 speed_factor: float = 1.0) -> Timing:
    """Seconds per optimizer step of `total_batch` tokens, and what follows from it. A given
    `utilization` (set with --mfu, or an older `onecard bench` record) is the whole micro-batch's
    and replaces the modelled one and its fixed per-layer time. Otherwise the modelled compute runs
    `speed_factor` times faster: what `onecard bench` measured on this card against the model
    (`source` then says where it comes from)."""
    overhead = 0.0
    if utilization is None:
        utilization, why = default_utilization(gpu, config, recipe.compile, assume)
        overhead = layer_overhead_s(config, recipe, assume) / speed_factor
        if speed_factor != 1.0:
            utilization = min(1.0, utilization * speed_factor)
            why = f"{why}; x{speed_factor:.2f}, {source}"
        if not source and gpu.kind != "datacenter":  # not measured on this card: the model's guess
            why += "; run `onecard bench` to measure yours"
        source = why
    u = utilization
    per_gpu_tokens = total_batch // gpus
    micro_steps = max(1, per_gpu_tokens // (recipe.micro_batch * recipe.seq_len))
    model = flops_per_token(config)
    hardware = model + recompute_flops_per_token(config, recipe)
    fp8 = fp8_flops_per_token(config, recipe) if gpu.peak_fp8 else 0
    compute = per_gpu_tokens * (hardware - fp8) / (gpu.peak_bf16 * u) + micro_steps * overhead
    if fp8 and recipe.compile:
        compute += per_gpu_tokens * fp8 / (gpu.peak_fp8 * u * assume.fp8_efficiency)
    elif fp8:  # eager fp8: slower than bf16 (see the assumption)
        compute += per_gpu_tokens * fp8 / (gpu.peak_bf16 * u * assume.fp8_eager_efficiency)

    # The optimizer: Newton-Schulz runs on the GPU in bf16 wherever the states live (with
    # optim_place=cpu each matrix travels to the GPU and back in bf16 for it). The elementwise
    # update streams weights, gradients and states once through the memory they live in. With
    # several cards each rank updates the parameters it owns (recipe.shard_owners): the busiest
    # rank's share of the states stands for its share of the update.
    persistent = persistent_bytes(config, recipe, "cuda")
    share = 1.0
    if gpus > 1:
        owned = persistent_bytes(config, recipe, "cuda", gpus)
        share = (owned.optimizer + owned.host_optimizer) / (persistent.optimizer + persistent.host_optimizer)
    numel = sum(param_counts(config).values())
    matrices = param_counts(config)["blocks"]
    ns = newton_schulz_flops(config)
    tensors = sum(len(shapes) for shapes in parameter_shapes(config).values())
    optimizer = ns / (gpu.peak_bf16 * u) + tensors * assume.optimizer_tensor_overhead_s
    pbytes = DTYPE_BYTES[parameter_dtypes(recipe, "cuda")["blocks"]]
    pcie, host_s = 0.0, 0.0
    if recipe.optim_place == "gpu":
        optimizer += 2 * (persistent.weights + persistent.grads + persistent.optimizer) / gpu.memory_bandwidth
    else:
        host = persistent.host_weights + persistent.host_grads + persistent.host_optimizer
        if recipe.params != "cpu_master":
            host += persistent.weights
        if recipe.grads != "cpu":
            host += persistent.grads
            pcie += persistent.grads  # gradients go to the CPU once per step
        # the ranks' processes share one host's memory bandwidth (torchrun --standalone) and update
        # at the same time: together they stream what one card's update does, in as long
        host_s = 2 * host / assume.cpu_memory_bandwidth
        pcie = share * (pcie + numel * pbytes + 2 * 2 * matrices)  # updated weights back; matrices to/from NS
    optimizer = optimizer * share + host_s
    grad_fold = 0.0
    if recipe.grads == "cpu":  # every micro-batch's gradients go out and are added up on the CPU,
        pcie += micro_steps * numel * pbytes  # on a background thread while backward goes on
        fold = numel * assume.grad_fold_s_per_param
        hidden = min(fold, backward_share(config, recipe) * compute / micro_steps) * assume.grad_fold_overlap
        grad_fold = micro_steps * (fold - hidden)
    if recipe.activations == "offload":
        from onecard.plan.memory import activation_bytes
        pcie += micro_steps * activation_bytes(config, recipe, "bf16").pcie_bytes
    pcie_bw = gpu.pcie_bytes_per_s * assume.pcie_efficiency
    pcie_s = pcie / pcie_bw * (1 - assume.pcie_overlap)

    comm = 0.0
    if gpus > 1:  # once per step, each gradient summed onto its owner and each weight sent from it:
        link = gpu.nvlink or pcie_bw  # a pipelined ring carries each tensor over every link once
        moved = persistent.grads + persistent.weights
        # gradients in CPU RAM (grads=cpu) are summed through gloo in host memory, not over the cards' links
        comm = (moved / link + persistent.host_grads / assume.cpu_memory_bandwidth) * (1 - assume.dp_overlap)

    step = compute + optimizer + pcie_s + comm + grad_fold
    tokens_per_s = total_batch / step
    return Timing(utilization=u, utilization_source=source, model_flops_per_token=model,
                  hardware_flops_per_token=hardware, fp8_flops_per_token=fp8,
                  optimizer_flops_per_step=ns, micro_steps=micro_steps, compute_s=compute,
                  optimizer_s=optimizer, pcie_bytes=pcie, pcie_s=pcie_s, comm_s=comm, step_s=step,
                  grad_fold_s=grad_fold, tokens_per_s=tokens_per_s, mfu=model * tokens_per_s / (gpu.peak_bf16 * gpus))


def energy_kwh(seconds: float, gpu_watts: float, gpus: int = 1, assume: Assumptions = DEFAULT) -> float:
    """Board power x power fraction x cards, plus the rest of the system, over the run."""
    watts = gpu_watts * assume.power_fraction * gpus + assume.overhead_watts
    return watts * seconds / 3.6e6
