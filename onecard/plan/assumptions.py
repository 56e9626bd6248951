"""Every number the planner assumes rather than derives, in one place, each with its reason.

Hardware figures live in catalog.py (each with its vendor source); byte layouts live in
onecard/recipe.py. What is left are the judgement calls and fitted constants below. Each can be
overridden from the command line with `--assume NAME=VALUE`, and calibration (`onecard bench`) replaces the
modelled utilization with a measurement on the user's own card.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from onecard.errors import UsageError
from onecard.units import NumberError, parse_number

MiB = 2**20


@dataclass(frozen=True)
class Assumptions:
    # Device memory held by the CUDA context itself (driver state, loaded kernels). It is not
    # counted by torch.cuda.max_memory_allocated but is gone from the card. With CUDA 12 lazy
    # module loading (the default since CUDA 12.2; NVIDIA CUDA C++ Programming Guide, "Lazy
    # Loading") PyTorch's context takes roughly 300-600 MiB on Ada/Hopper: we take 500 MiB.
    cuda_context_bytes: int = 500 * MiB
    # Scratch that libraries keep outside the tensors we count: cuBLAS/cuBLASLt workspaces
    # (PyTorch defaults to several MiB per handle, 32 MiB on Hopper), FlashAttention and NCCL
    # buffers. A round 256 MiB covers them with room.
    workspace_bytes: int = 256 * MiB
    # PyTorch's caching allocator reserves more than it hands out (blocks split for one size
    # cannot serve another). Reserved minus allocated is typically 5-15 % of the peak in
    # transformer training; we add 10 % of the allocated peak. Setting
    # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True makes it smaller.
    fragmentation: float = 0.10
    # Pinned host<->device copies reach about 80 % of a PCIe link's per-direction rate
    # (CUDA samples' bandwidthTest: ~25 GB/s on a 31.5 GB/s PCIe 4.0 x16 link).
    pcie_efficiency: float = 0.80
    # Share of PCIe transfer time hidden behind GPU compute. 0 = none (the conservative bound:
    # activation offload via saved-tensor hooks copies when a tensor is saved or needed).
    pcie_overlap: float = 0.0
    # Host memory bandwidth available to the optimizer update when it runs on the CPU
    # (optim_place=cpu). A dual-channel DDR4/DDR5 desktop sustains 20-40 GB/s in STREAM-like
    # loops; we take the low end because the update also converts dtypes.
    cpu_memory_bandwidth: float = 20e9
    # CPU time per parameter to fold one micro-batch's gradient into the fp32 buffer in CPU RAM
    # (grads=cpu): the copy off the card and the add. Fitted by benchmarks/fit_planner.py to the seven
    # grads=cpu rows measured on an H200 machine with 16 CPU cores, when the fold ran inside backward
    # (benchmarks/results/gpu_session1, gpu_session2). They disagree: d20 folded at about 0.9 ns a
    # parameter, d32 at 1.5-2.0 ns, so these rows are predicted only within 37 %. It does not
    # shrink with a faster card: it is what makes grads=cpu slow.
    grad_fold_s_per_param: float = 1.9e-9
    # Share of that folding hidden behind the backward pass. The trainer folds on a background
    # thread from pinned staging buffers while backward goes on (onecard/grad_fold.py): the fold
    # of each micro-batch overlaps its own backward, so what exceeds the backward's time stays
    # exposed. 1 = that overlap; 0 = folding inside backward, as the trainer did when the rows of
    # benchmarks/results/gpu_session1 and gpu_session2 were measured. Not yet measured on a GPU.
    grad_fold_overlap: float = 1.0
    # Share of the data-parallel exchange (gradients onto their owners, weights back) hidden behind
    # backward. onecard exchanges them once per optimizer step, after the last micro-batch's
    # backward (onecard/distributed.py): nothing overlaps.
    dp_overlap: float = 0.0
    # ---- How fast a step runs (docs/time.md#utilization). Fitted by benchmarks/fit_planner.py to
    # onecard's eager rows measured on an H200 (benchmarks/results/gpu_session1, gpu_session2) and
    # checked against the published compiled runs named below; every measured row's prediction is
    # listed in benchmarks/README.md. The share of the bf16 peak a micro-batch reaches is
    #     matmul_ceiling x d / (d + overhead_width x peak_bf16 / memory_bandwidth)
    # plus a fixed time per layer per micro-batch: the work that is not matrix multiplication
    # (norms, rotary, activations, soft-cap, loss) grows with the width d while matmul FLOPs grow
    # with d squared, and it is paid in memory traffic, so it costs more on a card with more FLOPs
    # per byte of bandwidth (H100 295, H200 206, RTX 4090 164, RTX 4070 116).
    # The share of the peak the matrix multiplications and attention themselves reach, the
    # ceiling the width term approaches. Fitted with eager_overhead_width, eager_layer_overhead_s
    # and optimizer_tensor_overhead_s to the 10 measured H200 rows that keep everything on the card:
    # every one predicted within 16 %. With compiled_overhead_width it gives nanochat's compiled
    # d20 and d32 runs 45.9 % and 55.2 % (published 48 % and 50.9 %) and nanoGPT's compiled GPT-2
    # 124M on an RTX 4090 47.5 % (published 55 %, karpathy/nanoGPT pull request 225; checked, not
    # fitted): conservative for GeForce cards.
    matmul_ceiling: float = 0.83
    # Eager mode: each elementwise operation reads and writes its whole tensor (fitted, above).
    eager_overhead_width: float = 6.4
    # Compiled: torch.compile fuses the elementwise work into few kernels. Fitted to nanochat's
    # compiled runs on 8 x H100: d20 at micro-batch 32, MFU 47.4-48.7 % (the report.md that
    # nanochat's speedrun.sh writes, commit af82c3a, 2025-10-16), and d32 at micro-batch 8, 50.9 %
    # (run1000.sh at commit fae3aca). onecard's own compiled step is not yet measured: the planner
    # assumes it matches nanochat's (benchmarks/run_on_gpu.sh measures it).
    compiled_overhead_width: float = 3.5
    # Eager mode also pays a fixed time per layer per micro-batch (kernel launches from Python, the
    # recompute and loss-chunk bookkeeping): what makes micro-batch 1 slow (d32 `lean` at
    # micro-batch 1 ran at 8.4 % MFU on an H200). Fitted, above; a fixed time, so it matters less on
    # a slower card.
    eager_layer_overhead_s: float = 2.8e-3
    # Compiled: not measured. nanochat's compiled d32 ran 4 micro-batches of 16,384 tokens and d20 one
    # of 65,536, and the width model fits both without one, so it is below what they resolve: taken
    # as 0 until benchmarks/run_on_gpu.sh measures a compiled micro-batch 1.
    compiled_layer_overhead_s: float = 0.0
    # onecard's optimizer runs eagerly, parameter by parameter: a fixed time per parameter tensor per
    # step beyond its FLOPs and bytes. Fitted, above, chiefly to d20 `lean`'s update timed alone on
    # an H200 (0.158 s for 122 tensors, benchmarks/results/gpu_session2).
    optimizer_tensor_overhead_s: float = 1.0e-3
    # Laptop parts are rated at a top boost clock they rarely hold under sustained tensor load
    # (35-115 W for an RTX 4070 Laptop): three quarters of the ceiling, an assumption.
    laptop_clock_factor: float = 0.75
    # FP8 matmuls run this fraction of the way to the FP8 peak relative to how bf16 runs to its
    # own: per-tensor scaling, amax reductions and casts around every GEMM eat the rest.
    # torchao's float8 training reports 1.2-1.5x end-to-end speedups on H100 rather than 2x;
    # 0.7 on the block linears (~80 % of the FLOPs) gives about 1.3x.
    fp8_efficiency: float = 0.70
    # Without torch.compile, torchao's fp8 casts and scalings run as separate kernels and fp8 is
    # slower than bf16 (pytorch/ao issue 685; torchtitan calls compile required for float8).
    # Measured here: lean-fp8 in eager mode ran at 0.47-0.54x the tokens/s of lean on an H200
    # (benchmarks/results/gpu_session1). The rate on the fp8 FLOPs (~80 % of them), as a share of
    # the bf16 rate, is fitted to those rows with the others (benchmarks/fit_planner.py): 0.39.
    # Used for recipes with matmul=fp8 and compile off.
    fp8_eager_efficiency: float = 0.39
    # Average board power as a fraction of the rated board power while training: sustained
    # tensor-core work keeps a card at its power limit.
    power_fraction: float = 1.0
    # Power of the rest of the computer (CPU, RAM, fans, PSU losses) to add to the energy bill.
    # 0 counts the GPU board only; 60-120 W is typical of a desktop around a single GPU.
    overhead_watts: float = 0.0

    def with_overrides(self, pairs: list[str] | None) -> Assumptions:
        """Apply 'name=value' strings, e.g. ['fragmentation=0.05']."""
        if not pairs:
            return self
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, float | int] = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise UsageError(f"--assume takes NAME=VALUE with NAME one of: {', '.join(known)}")
            try:
                value = parse_number(text)
            except NumberError as error:
                raise UsageError(f"--assume {name}: {error}") from None
            if value < 0:
                raise UsageError(f"--assume {name} must not be negative, got {value:g}")
            if name in FRACTIONS and value > 1:
                raise UsageError(f"--assume {name} is a fraction from 0 to 1, got {value:g}")
            if name in DIVISORS and value == 0:
                raise UsageError(f"--assume {name} must be above 0: the planner divides by it")
            changes[name] = int(value) if known[name] in ("int", int) else value
        return replace(self, **changes)


# Shares of a whole: a value above 1 would be a typo, not an assumption.
FRACTIONS = ("fragmentation", "pcie_efficiency", "pcie_overlap", "dp_overlap", "matmul_ceiling",
             "laptop_clock_factor", "grad_fold_overlap", "fp8_efficiency", "fp8_eager_efficiency", "power_fraction")

# Rates the planner divides by.
DIVISORS = ("pcie_efficiency", "cpu_memory_bandwidth", "matmul_ceiling", "laptop_clock_factor",
            "fp8_efficiency", "fp8_eager_efficiency")

DEFAULT = Assumptions()
