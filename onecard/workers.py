"""Decode workers for the server: requests wait in a bounded queue and N threads generate them,
each with its own Engine call and KV cache over the one model (its weights are only read).

A worker turns tokens into text at whole characters, shows calculator calls as `onecard chat`
does, cuts each sample at the first stop string (holding back text that might begin one), and
checks the request's `cancelled` flag between steps, so that a client that went away stops its
generation within one step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from onecard.conversations import show_tool_calls
from onecard.engine import Engine, Sampling, TextStream

log = logging.getLogger("onecard.serve")

# Events a job sends back: ("text", sample, piece), ("finish", sample, "stop" | "length"),
# then ("done", completion_tokens) or ("error", message).
Event = tuple


@dataclass(eq=False)  # hashable by identity: the workers keep a set of running jobs
class Job:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]  # called from the worker thread
    n: int = 1
    stops: list[str] = field(default_factory=list)
    tools: bool = True  # chat requests run the calculator; raw completions do not
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    """Every worker is busy and the queue holds as many requests as it may."""


class StopFilter:
    """Text in, text out, cut before the first stop string; a tail that might begin one waits."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that may be shown now, whether a stop string was reached)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Sample:
    """One sample's text on its way out."""

    def __init__(self, engine: Engine, stops: list[str]) -> None:
        self.stream, self.filter = TextStream(engine.tokenizer), StopFilter(stops)
        self.finished: str | None = None
        self.tokens = 0


def run_job(engine: Engine, job: Job) -> None:
    """Generate `job`, sending its events; returns early (sending nothing more) once cancelled."""
    samples = [_Sample(engine, job.stops) for _ in range(job.n)]

    def finish(i: int, sample: _Sample, reason: str, flush: bool = True) -> None:
        if flush:  # the last bytes of a character, and text held back for a stop string
            text, hit = sample.filter.push(show_tool_calls(sample.stream.flush()))
            tail = text if hit else text + sample.filter.flush()
            if tail:
                job.emit(("text", i, tail))
        sample.finished = reason
        job.emit(("finish", i, reason))

    steps = engine.generate(job.prompt, job.sampling, job.n)
    try:
        for step in steps:
            if job.cancelled.is_set():
                return
            for i, (sample, item) in enumerate(zip(samples, step, strict=True)):
                if sample.finished or item is None:
                    continue
                token, forced = item
                sample.tokens += 1
                if token in engine.stop_ids and not forced:
                    finish(i, sample, "stop")
                    continue
                text, hit = sample.filter.push(show_tool_calls(sample.stream.push(token)))
                if text:
                    job.emit(("text", i, text))
                if hit:
                    finish(i, sample, "stop", flush=False)
            if all(s.finished for s in samples):
                break
    finally:
        steps.close()
    for i, sample in enumerate(samples):
        if not sample.finished:
            finish(i, sample, "length")
    job.emit(("done", sum(s.tokens for s in samples)))


class Workers:
    """`count` threads taking jobs from a queue of at most `max_queued` waiting ones."""

    def __init__(self, make_engine: Callable[[bool], Engine], count: int, max_queued: int) -> None:
        self.make_engine = make_engine
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queued)
        self.running = 0
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self.threads = [threading.Thread(target=self._loop, name=f"onecard-decode-{i}", daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            with self._lock:
                self.running += 1
                self._jobs.add(job)
            try:
                run_job(self.make_engine(job.tools), job)
            except Exception as error:  # one bad request must not take the worker down
                log.exception("generation failed")
                job.emit(("error", f"generation failed: {type(error).__name__}: {error}"))
            finally:
                with self._lock:
                    self.running -= 1
                    self._jobs.discard(job)

    def cancel_all(self) -> None:
        """Cancel what runs and drop what waits; each of their clients hears that the server is shutting down."""
        with self._lock:
            stopped = list(self._jobs)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                stopped.append(job)
        for job in stopped:
            job.cancelled.set()
            job.emit(("error", "the server is shutting down"))

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what runs, drop what waits, and stop the threads."""
        self.cancel_all()
        for _ in self.threads:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                break
        for thread in self.threads:
            thread.join(timeout)
