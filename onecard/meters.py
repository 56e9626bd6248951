"""What a run measures and shows: tokens/s, MFU, memory, power → kWh and cost, ETA, progress.

Every figure is measured or derived in the open: MFU needs the card's peak from the planner's
catalog (None on the CPU or an unknown card); energy comes from NVML when it can read the
card's power, from a power figure the user states (--power, marked as an estimate) otherwise,
and is None when there is neither. Cost is energy × --price, None without both; each session's
energy at the price it was given, summed across sessions.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn
from rich.progress import Progress as RichProgress

from onecard.device import card_peak_flops
from onecard.units import format_duration

# ---------------------------------------------------------------- the card

def nvml_power_reader(device: str) -> Callable[[], float] | None:
    """A function returning the CUDA card's board power in watts, or None without NVML."""
    if device != "cuda":
        return None
    try:
        import pynvml
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        try:  # the card torch uses, found by PCI address (CUDA and NVML may number cards differently)
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:
            if pynvml.nvmlDeviceGetCount() != 1:
                return None  # cannot tell which card is ours: better no figure than another card's
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        pynvml.nvmlDeviceGetPowerUsage(handle)  # fails now, not in the sampling thread
    except Exception:  # nvidia-ml-py not installed, no driver, or a card without power readings
        return None
    return lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts


class PowerMeter:
    """Joules used since start(): NVML power sampled in a background thread and integrated by the
    trapezoid rule; or a stated power × time (source "estimate"); or None (source None)."""

    def __init__(self, read_watts: Callable[[], float] | None, stated_watts: float | None = None,
                 interval_s: float = 1.0) -> None:
        self.read_watts = read_watts
        self.stated_watts = stated_watts
        self.interval_s = interval_s
        self.source = "nvml" if read_watts else ("estimate" if stated_watts else None)
        self._joules = 0.0
        self._last: tuple[float, float] | None = None  # (time, watts) of the latest sample
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def start(self) -> PowerMeter:
        self._started = time.monotonic()
        if self.read_watts:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="onecard-power", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a driver hiccup: skip this sample, the next one bridges the gap
                pass

    def sample(self) -> None:
        now, watts = time.monotonic(), float(self.read_watts())
        with self._lock:
            if self._last is not None:
                then, before = self._last
                self._joules += (now - then) * (watts + before) / 2
            self._last = (now, watts)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.sample()

    def watts(self) -> float | None:
        if self.source == "nvml":
            with self._lock:
                return self._last[1] if self._last else None
        return self.stated_watts

    def joules(self) -> float | None:
        if self.source == "nvml":
            with self._lock:
                return self._joules
        if self.source == "estimate":
            return self.stated_watts * (time.monotonic() - self._started)
        return None


# ---------------------------------------------------------------- per-step figures and run totals

class Meters:
    """Turns each step's timing into the figures of its log line, and keeps the run's totals
    (which a checkpoint saves, so they add up across sessions)."""

    def __init__(self, device: str, flops_per_token: int, total_steps: int, power: PowerMeter,
                 price: float | None = None, currency: str = "USD", totals: dict | None = None,
                 window: int = 50, cards: int = 1, sum_over_cards: Callable[[float | None], float | None] | None = None
                 ) -> None:
        """cards > 1: a data-parallel run; tokens are the whole step's, the peak is all the cards', and
        sum_over_cards adds up every card's energy at each step (a collective: every rank calls step)."""
        self.device = device
        self.card, one_card_peak = card_peak_flops(device)
        self.peak_flops = one_card_peak * cards if one_card_peak else None
        self.sum_over_cards = sum_over_cards
        self.session_j = None
        self.flops_per_token = flops_per_token
        self.total_steps = total_steps
        self.power = power
        self.price, self.currency = price, currency
        saved = totals or {}
        self.tokens = saved.get("tokens", 0)
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.prior_wall_s = saved.get("wall_s", 0.0)
        self.prior_energy_j = saved.get("energy_j", 0.0)  # measured or estimated in earlier sessions
        self.prior_uncounted_s = saved.get("energy_uncounted_s", 0.0)
        # the earlier sessions' energy at the prices they were given: a tariff changed over the months of a
        # run does not re-price what was used before. Without that sum (older checkpoints, no price before,
        # another currency), all the energy is priced now.
        same_currency = saved.get("currency") == currency
        self.prior_cost = saved.get("cost") if same_currency else None
        self.energy_sources = set(saved.get("energy_sources", []))
        if power.source:
            self.energy_sources.add(power.source)
        self.session_start = time.monotonic()
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)  # (time, step) for the ETA
        self.peak_vram = 0

    def wall_s(self) -> float:
        """Seconds of training across all sessions (evaluations and checkpoints included)."""
        return self.prior_wall_s + time.monotonic() - self.session_start

    def energy_j(self) -> float | None:
        session = self.session_j if self.sum_over_cards else self.power.joules()
        if session is None and not self.energy_sources:
            return None
        return self.prior_energy_j + (session or 0.0)

    def energy_uncounted_s(self) -> float:
        """Wall seconds no energy figure covers (sessions without NVML and without --power)."""
        session = 0.0 if self.power.source else time.monotonic() - self.session_start
        return self.prior_uncounted_s + session

    def cost(self, energy_j: float | None) -> float | None:
        if energy_j is None or self.price is None:
            return None
        if self.prior_cost is None:
            return energy_j / 3.6e6 * self.price
        return self.prior_cost + (energy_j - self.prior_energy_j) / 3.6e6 * self.price

    def eta_s(self, step: int) -> float | None:
        """Remaining steps × the mean wall time of the recent steps (evaluations and saves included)."""
        if len(self.recent) < 2:
            return None
        (t0, s0), (t1, s1) = self.recent[0], self.recent[-1]
        return (t1 - t0) / (s1 - s0) * (self.total_steps - step)

    def step(self, step: int, tokens: int, step_time_s: float, skipped: bool = False) -> dict:
        """The meter fields of one step's log line (see train.py for the whole schema)."""
        self.tokens += tokens
        self.skipped_steps += int(skipped)
        self.recent.append((time.monotonic(), step))
        if self.sum_over_cards:
            self.session_j = self.sum_over_cards(self.power.joules())
        tokens_per_s = tokens / step_time_s if step_time_s > 0 else None
        mfu = None
        if self.peak_flops and tokens_per_s:
            mfu = self.flops_per_token * tokens_per_s / self.peak_flops
        vram = vram_peak = None
        if self.device == "cuda":
            vram = torch.cuda.memory_allocated()
            vram_peak = torch.cuda.max_memory_allocated()
            self.peak_vram = max(self.peak_vram, vram_peak)
        energy = self.energy_j()
        return {
            "step_time_s": step_time_s, "tokens": self.tokens, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "vram_bytes": vram, "vram_peak_bytes": vram_peak, "host_peak_bytes": host_peak_bytes(),
            "power_w": self.power.watts(), "energy_kwh": None if energy is None else energy / 3.6e6,
            "energy_estimated": "estimate" in self.energy_sources, "cost": self.cost(energy),
            "wall_s": self.wall_s(), "eta_s": self.eta_s(step), "time": time.time(),
        }

    def totals(self) -> dict:
        """What a checkpoint keeps so the next session goes on counting."""
        energy = self.energy_j()
        return {"tokens": self.tokens, "skipped_steps": self.skipped_steps, "wall_s": self.wall_s(),
                "energy_j": energy or 0.0, "energy_sources": sorted(self.energy_sources),
                "energy_uncounted_s": self.energy_uncounted_s(), "cost": self.cost(energy), "currency": self.currency}

    def summary(self) -> dict:
        """The meters' part of summary.json."""
        energy = self.energy_j()
        wall = self.wall_s()
        return {
            "tokens": self.tokens, "wall_s": wall, "skipped_steps": self.skipped_steps,
            "tokens_per_s_mean": self.tokens / wall if wall > 0 else None,
            "device": self.device, "gpu": self.card, "peak_flops": self.peak_flops,
            "vram_peak_bytes": self.peak_vram if self.device == "cuda" else None,
            "host_peak_bytes": host_peak_bytes(),
            "energy_kwh": None if energy is None else energy / 3.6e6,
            "energy_sources": sorted(self.energy_sources), "energy_uncounted_s": self.energy_uncounted_s(),
            "stated_power_w": self.power.stated_watts if self.power.source == "estimate" else None,
            "price_per_kwh": self.price, "currency": self.currency, "cost": self.cost(energy),
        }


def host_peak_bytes() -> int:
    """The process's peak resident memory (Linux reports kibibytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------- the display

def status_line(step: int, total: int, record: dict, currency: str = "") -> str:
    """step, loss, tok/s and whatever else the record has: MFU, VRAM, power, kWh, cost, ETA."""
    loss, smoothed = record.get("loss"), record.get("loss_smoothed")
    shown = "loss skipped" if loss is None else f"smoothed loss {smoothed:.4f}" if smoothed is not None \
        else f"loss {loss:.4f}"
    parts = [f"step {step}/{total}", shown]
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("vram_peak_bytes") is not None:
        parts.append(f"VRAM {record['vram_bytes'] / 2**30:.1f}/{record['vram_peak_bytes'] / 2**30:.1f} GiB")
    if record.get("power_w") is not None:
        parts.append(f"{record['power_w']:.0f} W")
    if record.get("energy_kwh") is not None:
        estimated = "~" if record.get("energy_estimated") else ""
        parts.append(f"{estimated}{record['energy_kwh']:.3f} kWh")
    if record.get("cost") is not None:
        parts.append(f"{record['cost']:.2f} {currency}".rstrip())
    parts.append(f"elapsed {format_duration(record.get('wall_s', 0))}")
    if record.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    if record.get("val_bpb") is not None:
        parts.append(f"val {record['val_bpb']:.4f} bpb")
    return " | ".join(parts)


LOSS_BETA = 0.9  # the shown loss's exponential moving average: nanochat's base_train.py uses 0.9


class Progress:
    """A live bar with the status line on a terminal (rich); a plain line every `every` steps,
    at each evaluation and at the end otherwise (a log file, a pipe, nohup)."""

    def __init__(self, total_steps: int, stream=None, every: int = 10, currency: str = "",
                 start_step: int = 0) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.every = every
        self.currency = currency
        self.bar: RichProgress | None = None
        # shown: the losses' moving average (as nanochat prints it), since one step's loss swings with
        # its batch; log.jsonl keeps each step's own
        self.average, self.averaged = 0.0, 0
        if self.live:
            console = Console(file=self.stream)
            self.bar = RichProgress(TextColumn("[bold]{task.fields[head]}"), BarColumn(), TaskProgressColumn(),
                                    TextColumn("{task.fields[line]}"), console=console, transient=False,
                                    refresh_per_second=4)
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, head="", line="")

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, step: int, record: dict) -> None:
        if record.get("loss") is not None:
            self.average, self.averaged = LOSS_BETA * self.average + (1 - LOSS_BETA) * record["loss"], self.averaged + 1
            record = {**record, "loss_smoothed": self.average / (1 - LOSS_BETA ** self.averaged)}  # debiased
        line = status_line(step, self.total, record, self.currency)
        if self.bar is not None:
            head, _, rest = line.partition(" | ")
            self.bar.update(self.task, completed=step, head=head, line=rest)
            if record.get("val_bpb") is not None:
                self.bar.console.print(line)  # evaluations stay on screen above the bar
        elif step % self.every == 0 or step == self.total or record.get("val_bpb") is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
