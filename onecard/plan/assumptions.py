"""Every number the planner assumes rather than derives, in one place, each with its reason.

Hardware figures live in catalog.py (each with its vendor source); byte layouts live in
onecard/recipe.py. What is left are the judgement calls below. Each can be overridden from the
command line with `--assume NAME=VALUE`, and calibration (`onecard bench`) replaces the
utilization guesses with a measurement on the user's own card.
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
    # (grads=cpu): the copy off the card and the add, done in backward's gradient hooks.
    # Measured, not guessed: on an H200 machine with 16 CPU cores, d32 with the offload recipe
    # spent 2.7-3.8 s per micro-batch beyond its GPU compute for 1.88e9 parameters, 1.45-2.0 ns
    # each (benchmarks/results/gpu_session2, benchmarks/README.md); we take the middle, 1.7 ns.
    # It does not shrink with a faster card: it is what makes grads=cpu slow.
    grad_fold_s_per_param: float = 1.7e-9
    # Share of the data-parallel gradient all-reduce hidden behind backward. onecard averages the
    # gradients once per optimizer step, after the last micro-batch's backward
    # (onecard/distributed.py): nothing overlaps.
    dp_overlap: float = 0.0
    # Utilization of the bf16 peak on the FLOPs a step really executes (recompute included).
    # Datacenter default: nanochat's published d32 run reached ~51 % MFU on H100s at 8 x 2048
    # tokens per micro-batch with nothing recomputed (docs/architecture.md#published-d32-run).
    mfu_datacenter: float = 0.51
    # Desktop GeForce default: 40 %, an assumption with no measurement behind it (an earlier
    # "realistic 40-50 %" had none either and is withdrawn: docs/time.md#utilization), kept
    # because boards hold their boost clock only within their power limit and micro-batches
    # are small. Calibrate with `onecard bench` to replace it.
    mfu_consumer: float = 0.40
    # Laptop parts are rated at a top boost clock they rarely hold under sustained tensor load
    # (35-115 W for an RTX 4070 Laptop): three quarters of the desktop default.
    mfu_laptop: float = 0.30
    # FP8 matmuls run this fraction of the way to the FP8 peak relative to how bf16 runs to its
    # own: per-tensor scaling, amax reductions and casts around every GEMM eat the rest.
    # torchao's float8 training reports 1.2-1.5x end-to-end speedups on H100 rather than 2x;
    # 0.7 on the block linears (~80 % of the FLOPs) gives about 1.3x.
    fp8_efficiency: float = 0.70
    # Without torch.compile, torchao's fp8 casts and scalings run as separate kernels and fp8 is
    # slower than bf16 (pytorch/ao issue 685; torchtitan calls compile required for float8).
    # Measured here: lean-fp8 in eager mode ran at 0.47-0.54x the tokens/s of lean on an H200
    # (benchmarks/results/gpu_session1). 0.45 of the bf16 rate on the fp8 FLOPs (~80 % of them)
    # reproduces that ~0.5x. Used for recipes with matmul=fp8 and compile off.
    fp8_eager_efficiency: float = 0.45
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
FRACTIONS = ("fragmentation", "pcie_efficiency", "pcie_overlap", "dp_overlap", "mfu_datacenter", "mfu_consumer",
             "mfu_laptop", "fp8_efficiency", "fp8_eager_efficiency", "power_fraction")

# Rates the planner divides by.
DIVISORS = ("pcie_efficiency", "cpu_memory_bandwidth", "mfu_datacenter", "mfu_consumer", "mfu_laptop",
            "fp8_efficiency", "fp8_eager_efficiency")

DEFAULT = Assumptions()
