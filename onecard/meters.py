"""What a run shows while it works: a live progress line with step, loss, tokens/s and ETA."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


class Progress:
    """One line rewritten in place on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, total_steps: int, stream=None, every: int = 10) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.every = every
        self.started = time.perf_counter()

    def update(self, step: int, record: dict) -> None:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / step * (self.total - step)
        line = (f"step {step}/{self.total} | loss {record['loss']:.4f} | "
                f"{record['tokens_per_s']:,.0f} tok/s | elapsed {format_duration(elapsed)} | "
                f"ETA {format_duration(eta)}")
        if "val_bpb" in record:
            line += f" | val {record['val_bpb']:.4f} bpb"
        if self.live:
            self.stream.write("\r\033[K" + line)
            if "val_bpb" in record:
                self.stream.write("\n")
        elif step % self.every == 0 or step == self.total or "val_bpb" in record:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
