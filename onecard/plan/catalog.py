"""Graphics cards the planner knows, each figure with the vendor document it comes from.

peak_bf16 is dense tensor-core throughput with bf16 inputs and fp32 accumulation (what PyTorch
uses), not the sparse or fp16-accumulate figures on the box. GeForce cards run fp32
accumulation at half the fp16-accumulate rate, i.e. 512 FLOP per clock per SM on Ampere, Ada and
Blackwell GeForce; where a card is missing from its architecture whitepaper's appendix, the
figure is that per-SM rate times the SM count and boost clock from NVIDIA's product page.
peak_fp8 is dense fp8 with fp32 accumulation, None where the card has no FP8 tensor cores.
How the figures are derived: docs/hardware.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from onecard.errors import UsageError

T = 1e12
GB_S = 1e9
GiB = 2**30

AMPERE_WP = "NVIDIA Ampere GA102 GPU Architecture whitepaper, Appendix A"
ADA_WP = "NVIDIA Ada GPU Architecture whitepaper v2.1, Appendix A"
BLACKWELL_WP = "NVIDIA RTX Blackwell GPU Architecture whitepaper, Appendix A"
PER_SM = "tensor rate = SMs x boost clock x 512 FLOP/clk/SM (dense bf16, fp32 accumulate, as in {wp})"


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    vram_gib: float
    peak_bf16: float  # FLOP/s, dense, fp32 accumulate
    peak_fp8: float | None  # FLOP/s, dense, fp32 accumulate; None: no FP8 tensor cores
    memory_bandwidth: float  # bytes/s
    power_watts: float  # board power (TGP / TDP)
    compute_capability: tuple[int, int]
    pcie: tuple[int, int]  # (generation, lanes)
    kind: str  # "consumer" | "laptop" | "datacenter"
    source: str
    nvlink: float = 0.0  # GPU-to-GPU bytes/s per direction, 0 when the card talks over PCIe
    note: str = ""

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gib * GiB)

    @property
    def pcie_bytes_per_s(self) -> float:
        """Per-direction link rate: 8/16/32 GT/s per lane for gen 3/4/5, 128b/130b coding."""
        gt_per_lane = {3: 8e9, 4: 16e9, 5: 32e9}[self.pcie[0]]
        return gt_per_lane * self.pcie[1] * 128 / 130 / 8

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


def _g(key, name, vram, bf16, fp8, bw, watts, cc, pcie, kind, source, **extra) -> GPU:
    return GPU(key, name, vram, bf16 * T, None if fp8 is None else fp8 * T, bw * GB_S, watts,
               cc, pcie, kind, source, **extra)


GPUS: list[GPU] = [
    # Ampere GeForce (sm_86): no FP8.
    _g("rtx3060", "NVIDIA GeForce RTX 3060 12GB", 12, 25.5, None, 360, 170, (8, 6), (4, 16), "consumer",
       "GeForce RTX 3060 product page (28 SMs, 1.777 GHz boost, 360 GB/s, 170 W); "
       + PER_SM.format(wp=AMPERE_WP)),
    _g("rtx3060ti", "NVIDIA GeForce RTX 3060 Ti", 8, 32.4, None, 448, 200, (8, 6), (4, 16), "consumer",
       "GeForce RTX 3060 Ti product page (38 SMs, 1.665 GHz boost, 448 GB/s, 200 W); "
       + PER_SM.format(wp=AMPERE_WP)),
    _g("rtx3070", "NVIDIA GeForce RTX 3070", 8, 40.6, None, 448, 220, (8, 6), (4, 16), "consumer",
       "GeForce RTX 3070 product page (46 SMs, 1.725 GHz boost, 448 GB/s, 220 W); "
       + PER_SM.format(wp=AMPERE_WP)),
    _g("rtx3070ti", "NVIDIA GeForce RTX 3070 Ti", 8, 43.5, None, 608, 290, (8, 6), (4, 16), "consumer",
       "GeForce RTX 3070 Ti product page (48 SMs, 1.77 GHz boost, 608 GB/s, 290 W); "
       + PER_SM.format(wp=AMPERE_WP)),
    _g("rtx3080", "NVIDIA GeForce RTX 3080 10GB", 10, 59.5, None, 760, 320, (8, 6), (4, 16), "consumer",
       AMPERE_WP + " (RTX 3080: 59.5 TFLOPS FP16/BF16 tensor with FP32 accumulate, 760 GB/s, 320 W)"),
    _g("rtx3080ti", "NVIDIA GeForce RTX 3080 Ti", 12, 68.2, None, 912, 350, (8, 6), (4, 16), "consumer",
       "GeForce RTX 3080 Ti product page (80 SMs, 1.665 GHz boost, 912 GB/s, 350 W); "
       + PER_SM.format(wp=AMPERE_WP)),
    _g("rtx3090", "NVIDIA GeForce RTX 3090", 24, 71.0, None, 936, 350, (8, 6), (4, 16), "consumer",
       AMPERE_WP + " (RTX 3090: 71 TFLOPS BF16 tensor with FP32 accumulate, 936 GB/s, 350 W)"),
    # Ada GeForce (sm_89): FP8 with fp32 accumulate at twice the bf16 rate.
    _g("rtx4060", "NVIDIA GeForce RTX 4060 8GB", 8, 30.2, 60.5, 272, 115, (8, 9), (4, 8), "consumer",
       "GeForce RTX 4060 product page (24 SMs, 2.46 GHz boost, 272 GB/s, 115 W, PCIe 4.0 x8); "
       + PER_SM.format(wp=ADA_WP)),
    _g("rtx4060-laptop", "NVIDIA GeForce RTX 4060 Laptop GPU 8GB", 8, 29.1, 58.2, 256, 115, (8, 9), (4, 8),
       "laptop", "GeForce RTX 40 Series Laptop specs page (24 SMs, 1.47-2.37 GHz boost at 35-115 W, "
       "8 GB 128-bit, 256 GB/s); peak at the top 2.37 GHz clock; " + PER_SM.format(wp=ADA_WP),
       note="power-limited: the rated clock needs the laptop's top 115 W setting"),
    _g("rtx4060ti-8gb", "NVIDIA GeForce RTX 4060 Ti 8GB", 8, 44.1, 88.3, 288, 160, (8, 9), (4, 8),
       "consumer", "GeForce RTX 4060 Ti product page (34 SMs, 2.535 GHz boost, 288 GB/s, 160 W, "
       "PCIe 4.0 x8); " + PER_SM.format(wp=ADA_WP)),
    _g("rtx4060ti-16gb", "NVIDIA GeForce RTX 4060 Ti 16GB", 16, 44.1, 88.3, 288, 165, (8, 9), (4, 8),
       "consumer", "GeForce RTX 4060 Ti product page (34 SMs, 2.535 GHz boost, 288 GB/s, 165 W, "
       "PCIe 4.0 x8); " + PER_SM.format(wp=ADA_WP)),
    _g("rtx4070", "NVIDIA GeForce RTX 4070", 12, 58.3, 116.6, 504, 200, (8, 9), (4, 16), "consumer",
       "GeForce RTX 4070 product page (46 SMs, 2.475 GHz boost, 504 GB/s, 200 W); "
       + PER_SM.format(wp=ADA_WP)),
    _g("rtx4070-super", "NVIDIA GeForce RTX 4070 SUPER", 12, 71.0, 141.9, 504, 220, (8, 9), (4, 16),
       "consumer", "GeForce RTX 4070 SUPER product page (56 SMs, 2.475 GHz boost, 504 GB/s, 220 W); "
       + PER_SM.format(wp=ADA_WP)),
    _g("rtx4070ti", "NVIDIA GeForce RTX 4070 Ti", 12, 80.2, 160.4, 504, 285, (8, 9), (4, 16), "consumer",
       "GeForce RTX 4070 Ti product page (60 SMs, 2.61 GHz boost, 504 GB/s, 285 W); "
       + PER_SM.format(wp=ADA_WP)),
    _g("rtx4070ti-super", "NVIDIA GeForce RTX 4070 Ti SUPER", 16, 88.2, 176.4, 672, 285, (8, 9), (4, 16),
       "consumer", "GeForce RTX 4070 Ti SUPER product page (66 SMs, 2.61 GHz boost, 672 GB/s, 285 W); "
       + PER_SM.format(wp=ADA_WP)),
    _g("rtx4070-laptop", "NVIDIA GeForce RTX 4070 Laptop GPU 8GB", 8, 40.1, 80.2, 256, 115, (8, 9), (4, 8),
       "laptop", "GeForce RTX 40 Series Laptop specs page (36 SMs, 1.23-2.175 GHz boost at 35-115 W, "
       "8 GB 128-bit, 256 GB/s); peak at the top 2.175 GHz clock; " + PER_SM.format(wp=ADA_WP),
       note="power-limited: the rated clock needs the laptop's top 115 W setting"),
    _g("rtx4080", "NVIDIA GeForce RTX 4080", 16, 97.5, 194.9, 716.8, 320, (8, 9), (4, 16), "consumer",
       ADA_WP + " (RTX 4080: 97.5 TFLOPS FP16/BF16 tensor with FP32 accumulate, 716.8 GB/s, 320 W)"),
    _g("rtx4080-super", "NVIDIA GeForce RTX 4080 SUPER", 16, 104.4, 208.9, 736, 320, (8, 9), (4, 16),
       "consumer", "GeForce RTX 4080 SUPER product page (80 SMs, 2.55 GHz boost, 736 GB/s, 320 W); "
       + PER_SM.format(wp=ADA_WP)),
    _g("rtx4090", "NVIDIA GeForce RTX 4090", 24, 165.2, 330.3, 1008, 450, (8, 9), (4, 16), "consumer",
       ADA_WP + " (RTX 4090: 165.2 TFLOPS BF16 and 330.3 FP8 tensor with FP32 accumulate, "
       "1008 GB/s, 450 W)"),
    # Blackwell GeForce (sm_120): FP8 with fp32 accumulate at twice the bf16 rate, as on Ada. The
    # whitepaper's larger FP8 figures (838 dense for the 5090) are with FP16 accumulate, which
    # training does not use; plain fp8 GEMMs on a 5090 measure ~370 TFLOP/s (main-horse.github.io/
    # posts/5090-mm-perf), under 419 and far under 838.
    _g("rtx5070", "NVIDIA GeForce RTX 5070", 12, 61.7, 123.4, 672, 250, (12, 0), (5, 16), "consumer",
       "GeForce RTX 5070 product page (48 SMs, 2.51 GHz boost, 672 GB/s, 250 W); "
       + PER_SM.format(wp=BLACKWELL_WP) + "; fp8 with fp32 accumulate = 2 x bf16"),
    _g("rtx5080", "NVIDIA GeForce RTX 5080", 16, 112.6, 225.2, 960, 360, (12, 0), (5, 16), "consumer",
       "GeForce RTX 5080 product page (84 SMs, 2.617 GHz boost, 960 GB/s, 360 W); "
       + PER_SM.format(wp=BLACKWELL_WP) + "; fp8 with fp32 accumulate = 2 x bf16"),
    _g("rtx5090", "NVIDIA GeForce RTX 5090", 32, 209.5, 419.0, 1792, 575, (12, 0), (5, 16), "consumer",
       BLACKWELL_WP + " (RTX 5090: 209.5 TFLOPS FP16/BF16 and 419 FP8 tensor with FP32 accumulate, dense; "
       "1792 GB/s, 575 W)"),
    # Datacenter.
    _g("a10", "NVIDIA A10", 24, 125.0, None, 600, 150, (8, 6), (4, 16), "datacenter",
       "NVIDIA A10 Tensor Core GPU datasheet (BF16 125 TFLOPS dense / 250 sparse, 600 GB/s, 150 W)"),
    _g("l4", "NVIDIA L4", 24, 121.0, 242.5, 300, 72, (8, 9), (4, 16), "datacenter",
       "NVIDIA L4 Tensor Core GPU datasheet (BF16 242 / FP8 485 TFLOPS with sparsity, halved for "
       "dense; 300 GB/s, 72 W)"),
    _g("t4", "NVIDIA T4", 16, 8.1, None, 320, 70, (7, 5), (3, 16), "datacenter",
       "NVIDIA T4 Tensor Core GPU datasheet (FP32 8.1 TFLOPS, FP16 mixed precision 65 TFLOPS, "
       "320 GB/s, 70 W)",
       note="Turing has no bf16 tensor cores: bf16 runs at the FP32 rate (8.1 TFLOP/s)"),
    _g("a100-40gb", "NVIDIA A100 40GB SXM", 40, 312.0, None, 1555, 400, (8, 0), (4, 16), "datacenter",
       "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 TFLOPS dense, 40 GB HBM2 1555 GB/s, 400 W SXM)",
       nvlink=300 * GB_S),
    _g("a100-80gb", "NVIDIA A100 80GB SXM", 80, 312.0, None, 2039, 400, (8, 0), (4, 16), "datacenter",
       "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 TFLOPS dense, 80 GB HBM2e 2039 GB/s, 400 W SXM)",
       nvlink=300 * GB_S),
    _g("h100-sxm", "NVIDIA H100 80GB SXM", 80, 989.4, 1978.9, 3350, 700, (9, 0), (5, 16), "datacenter",
       "NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 1979 / FP8 3958 TFLOPS with sparsity, halved "
       "for dense; 3.35 TB/s, 700 W)", nvlink=450 * GB_S),
    _g("h100-pcie", "NVIDIA H100 80GB PCIe", 80, 756.5, 1513.0, 2000, 350, (9, 0), (5, 16), "datacenter",
       "NVIDIA H100 Tensor Core GPU datasheet (PCIe: BF16 1513 / FP8 3026 TFLOPS with sparsity, halved "
       "for dense; 2.0 TB/s, 350 W)"),
    _g("h200", "NVIDIA H200 141GB SXM", 141, 989.4, 1978.9, 4800, 700, (9, 0), (5, 16), "datacenter",
       "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1979 / FP8 3958 TFLOPS with sparsity, halved "
       "for dense; 141 GB HBM3e 4.8 TB/s, up to 700 W)", nvlink=450 * GB_S),
]
CATALOG: dict[str, GPU] = {g.key: g for g in GPUS}

# Short names that stand for several parts pick the most common one, and the planner says so.
SHORT: dict[str, str] = {
    "3060": "rtx3060", "3060ti": "rtx3060ti", "3070": "rtx3070", "3070ti": "rtx3070ti", "3080": "rtx3080",
    "3080ti": "rtx3080ti", "3090": "rtx3090", "4060laptop": "rtx4060-laptop", "4060mobile": "rtx4060-laptop",
    "4060ti8gb": "rtx4060ti-8gb", "4070ti": "rtx4070ti", "4080s": "rtx4080-super", "4080super": "rtx4080-super",
    "4060": "rtx4060", "4060ti": "rtx4060ti-16gb", "4060ti16gb": "rtx4060ti-16gb",
    "4070": "rtx4070", "4070s": "rtx4070-super", "4070super": "rtx4070-super",
    "4070tis": "rtx4070ti-super", "4070tisuper": "rtx4070ti-super",
    "4070laptop": "rtx4070-laptop", "4070mobile": "rtx4070-laptop",
    "4080": "rtx4080", "4090": "rtx4090", "5070": "rtx5070", "5080": "rtx5080", "5090": "rtx5090",
    "a10": "a10", "l4": "l4", "t4": "t4",
    "a100": "a100-80gb", "a10040gb": "a100-40gb", "a10080gb": "a100-80gb",
    "a100sxm": "a100-80gb", "a10040gbsxm": "a100-40gb", "a10080gbsxm": "a100-80gb",
    "a100sxm440gb": "a100-40gb", "a100sxm480gb": "a100-80gb",  # names torch reports
    "h100": "h100-sxm", "h100sxm": "h100-sxm", "h100sxm5": "h100-sxm", "h10080gbsxm": "h100-sxm",
    "h10080gbhbm3": "h100-sxm",
    "h100pcie": "h100-pcie", "h10080gbpcie": "h100-pcie", "h100nvl": "h100-pcie",
    "h200": "h200", "h200sxm": "h200", "h200141gbsxm": "h200",
}
AMBIGUOUS = {"h100": "the SXM part (say 'h100 pcie' for the PCIe card)",
             "a100": "the 80 GB SXM part (say 'a100 40gb' for the 40 GB card)",
             "4060ti": "the 16 GB card (say '4060 ti 8gb' for the 8 GB card)"}


def _normal(name: str) -> str:
    """'NVIDIA GeForce RTX 4070 Ti SUPER' -> '4070tisuper': lowercase, no brand words or spaces."""
    text = name.lower()
    for word in ("nvidia", "geforce", "tesla", "rtx", "gpu"):
        text = text.replace(word, " ")
    return re.sub(r"[^a-z0-9]", "", text)


def find_gpu(name: str) -> tuple[GPU, str | None]:
    """Look a card up by name; returns the card and a note when a short name picked a part."""
    key = _normal(name)
    by_key = {_normal(g.key): g for g in GPUS} | {_normal(g.name): g for g in GPUS}
    if key in by_key:
        return by_key[key], None
    if key in SHORT:
        gpu = CATALOG[SHORT[key]]
        note = f"'{name}' taken as {gpu.name}, {AMBIGUOUS[key]}" if key in AMBIGUOUS else None
        return gpu, note
    known = ", ".join(g.key for g in GPUS)
    raise UsageError(f"unknown GPU {name!r}: known GPUs are {known} (or give --vram GB with one of them)")


def with_vram(gpu: GPU, gigabytes: float) -> GPU:
    """The same card with a different memory size (--vram), e.g. a 16 GB variant."""
    if not gigabytes > 0:
        raise UsageError(f"--vram must be a positive number of GB, got {gigabytes}")
    return replace(gpu, vram_gib=float(gigabytes), note=(gpu.note + "; " if gpu.note else "")
                   + f"VRAM set to {gigabytes:g} GiB by --vram")
