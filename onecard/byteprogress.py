"""Progress of a download: bytes of all files together, with rate and ETA."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from onecard.datasources import format_bytes
from onecard.units import format_duration


class Progress:
    """Bytes of all files together, with rate and ETA: a rich bar on a terminal, a plain line every
    `every_s` seconds otherwise. Called from the worker threads."""

    def __init__(self, files: Sequence[object], done_bytes: float = 0, stream=None, every_s: float = 10.0):
        """`files`: the jobs (each with an `estimate` of its whole size); `done_bytes`: what of them is
        already on disk (partial files being resumed)."""
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._sizes = {id(job): job.estimate for job in files}
        self.total = float(sum(self._sizes.values()))
        self.done = float(done_bytes)
        self.received = 0.0  # this session's bytes: the rate
        self.files_left = len(files)
        self.started = time.monotonic()
        self.every_s, self._last = every_s, self.started
        self._bar = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(),
                                     console=Console(file=self.stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self._files_text(), total=self.total, completed=self.done)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _files_text(self) -> str:
        return f"{self.files_left} files left"

    def resize(self, job: object, size: float) -> None:
        """The server told a file's real size: the total follows."""
        with self._lock:
            self.total += size - self._sizes.get(id(job), size)
            self._sizes[id(job)] = size
            if self._bar is not None:
                self._bar.update(self._task, total=self.total)

    def advance(self, n: float) -> None:
        with self._lock:
            self.done += n
            self.received += max(n, 0)
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
            elif time.monotonic() - self._last >= self.every_s:
                self._last = time.monotonic()
                self._print(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.received / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = self.done / self.total if self.total else 1.0
        return (f"{format_bytes(self.done)} of {format_bytes(self.total)} ({share:.0%}), {format_bytes(rate)}/s, "
                f"ETA {format_duration(eta) if eta != float('inf') else '?'}, {self.files_left} files left")

    def file_done(self, result) -> None:
        with self._lock:
            self.files_left -= 1
            if self._bar is not None:
                self._bar.update(self._task, description=self._files_text())
        retried = f", {result.retries} retries" if result.retries else ""
        self.note(f"{result.job.name}: complete ({', '.join(result.checks) or 'no check possible'}{retried})")

    def note(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.console.print(text, markup=False, highlight=False)
            else:
                self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
