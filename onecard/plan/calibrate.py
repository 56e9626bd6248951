"""`onecard bench`: measure the local card once, remember it, and let `plan` use the measurement.

It times a large bf16 matmul (the card's practical peak), then a few training steps of a
nanochat-class GPT (model FLOPs per second over the catalog peak = MFU), sampling board power
through NVML when nvidia-ml-py is installed. Results go to $ONECARD_HOME/calibration.json
(default ~/.cache/onecard/calibration.json), one record per card.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from onecard.errors import UsageError


def home() -> Path:
    return Path(os.environ.get("ONECARD_HOME") or Path.home() / ".cache" / "onecard")


def calibration_path() -> Path:
    return home() / "calibration.json"


def load_all() -> dict:
    path = calibration_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged file is as good as none: bench writes a fresh one


def load(key: str) -> dict | None:
    return load_all().get(key)


def save(key: str, record: dict) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_all() | {key: record}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def matmul_flops(device: str, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Achieved FLOP/s of size x size x size matmuls (2 n^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm up kernels and clocks
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class PowerSampler:
    """Mean board power over a block of work, from NVML; None when NVML is unavailable."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._read = lambda: pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except Exception:  # not installed, or no driver access: report power as unknown
            self._read = None

    def __enter__(self) -> PowerSampler:
        if self._read:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self._read())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._read:
            self._thread.join()

    @property
    def watts(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def train_steps(depth: int, micro_batch: int, seq_len: int, steps: int) -> dict:
    """Time forward+backward of the real model on CUDA the way the trainer runs it (bf16 autocast)."""
    from onecard.model import GPTConfig, build_model, flops_per_token

    config = GPTConfig.from_depth(depth, sequence_len=seq_len)
    model = build_model(config, device="cuda")
    model.transformer.wte.to(torch.bfloat16)  # as nanochat keeps it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device="cuda")

    def step() -> None:  # forward + backward: what `plan`'s utilization covers (it models the update apart)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()

    for _ in range(2):
        step()
    optimizer.step()  # allocate the states, so peak memory includes them
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with PowerSampler() as power:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    tokens_per_s = steps * micro_batch * seq_len / seconds
    return {"depth": depth, "micro_batch": micro_batch, "seq_len": seq_len, "steps": steps,
            "tokens_per_s": tokens_per_s, "model_flops_per_s": tokens_per_s * flops_per_token(config),
            "max_memory_allocated": torch.cuda.max_memory_allocated(), "power_watts": power.watts}


def bench(gpu_name: str | None, depth: int, micro_batch: int, seq_len: int, steps: int,
          size: int | None, store: bool = True) -> tuple[dict, str]:
    """Run the measurements; returns the record and a few lines for the user."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not torch.cuda.is_available():
        size = size or 1024
        flops = matmul_flops("cpu", torch.float32, size, repeats=3)
        record = {"device": "cpu", "date": now, "torch": torch.__version__, "matmul_flops_fp32": flops}
        text = [f"no CUDA GPU here: measured the CPU only, {flops / 1e9:,.1f} GFLOP/s fp32 matmul ({size}^3).",
                "`onecard plan` uses calibration for CUDA cards; run `onecard bench` on the machine with the GPU."]
        if store:
            text.append(f"stored under 'cpu' in {save('cpu', record)}")
        return record, "\n".join(text)

    from onecard.plan.catalog import find_gpu

    device_name = torch.cuda.get_device_name(0)
    try:
        gpu, _ = find_gpu(gpu_name or device_name)
    except UsageError:
        raise UsageError(f"{device_name} is not in the catalog: say which card it is like with --gpu NAME") from None
    flops = matmul_flops("cuda", torch.bfloat16, size or 8192)
    train = train_steps(depth, micro_batch, seq_len, steps)
    mfu = train["model_flops_per_s"] / gpu.peak_bf16
    record = {"device": device_name, "key": gpu.key, "date": now, "torch": torch.__version__,
              "matmul_flops_bf16": flops, "matmul_efficiency": flops / gpu.peak_bf16, "mfu": mfu,
              "power_watts": train["power_watts"], "train": train}
    power = f"{train['power_watts']:.0f} W" if train["power_watts"] else "unknown (pip install nvidia-ml-py)"
    text = [f"{device_name} (catalog: {gpu.name}, {gpu.peak_bf16 / 1e12:.1f} TFLOP/s bf16 peak)",
            f"  matmul {size or 8192}^3 bf16: {flops / 1e12:.1f} TFLOP/s = {flops / gpu.peak_bf16:.0%} of peak",
            f"  training d{depth}, micro-batch {micro_batch} x {seq_len}: {train['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {mfu:.1%}, board power {power}",
            f"  peak memory allocated {train['max_memory_allocated'] / 2**30:.2f} GiB"]
    if store:
        text.append(f"stored in {save(gpu.key, record)}; `onecard plan` on this card now uses MFU {mfu:.1%}")
    return record, "\n".join(text)
