"""Decode workers for the server: requests wait in a bounded queue and N threads generate them,
each with its own Engine call and KV cache over the one model (its weights are only read).

A worker turns tokens into text at whole characters, shows calculator calls as `onecard chat`
does, cuts each sample at the first stop string (holding back text that might begin one), and
checks the request's `cancelled` flag between steps, so that a client that went away stops its
generation within one step.

The KV caches of the requests decoded at once share one budget of memory (`CacheMemory`): a job
waits, in turn, until its cache fits, so that --max-concurrent long requests cannot run the card out
of memory together.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from onecard.conversations import show_tool_calls
from onecard.engine import Engine, Sampling, TextStream

log = logging.getLogger("onecard.serve")

# Events a job sends back: ("text", sample, piece), ("finish", sample, "stop" | "length"),
# then ("done", completion_tokens) or ("error", message[, HTTP status: 500 unless said]).
Event = tuple


@dataclass(eq=False)  # hashable by identity: the workers keep a set of running jobs
class Job:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]  # called from the worker thread
    n: int = 1
    stops: list[str] = field(default_factory=list)
    tools: bool = True  # chat requests run the calculator; raw completions do not
    cache_bytes: int = 0  # the memory its KV caches take (CacheMemory)
    cancelled: threading.Event = field(default_factory=threading.Event)


class CacheMemory:
    """Bytes of KV cache shared by the jobs decoded at once, granted first come, first served (a
    large job is not passed over forever by small ones); `total` None: no limit."""

    def __init__(self, total: int | None) -> None:
        self.total, self.used = total, 0
        self._changed = threading.Condition()
        self._line: collections.deque[object] = collections.deque()  # the jobs waiting, in turn

    def take(self, nbytes: int, cancelled: threading.Event) -> bool:
        """Wait until `nbytes` fit; False (nothing taken) if the job is cancelled first."""
        if self.total is None:
            return True
        with self._changed:
            me = object()
            self._line.append(me)
            while not cancelled.is_set() and (self._line[0] is not me or self.used + nbytes > self.total):
                self._changed.wait(0.1)
            self._line.remove(me)
            self._changed.notify_all()
            if cancelled.is_set():
                return False
            self.used += nbytes
            return True

    @property
    def waiting(self) -> int:
        return len(self._line)

    def give_back(self, nbytes: int) -> None:
        if self.total is None:
            return
        with self._changed:
            self.used -= nbytes
            self._changed.notify_all()


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

    def __init__(self, make_engine: Callable[[bool], Engine], count: int, max_queued: int,
                 memory: CacheMemory | None = None) -> None:
        self.make_engine = make_engine
        self.memory = memory or CacheMemory(None)
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queued)
        self.running = 0
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self.threads = [threading.Thread(target=self._loop, name=f"onecard-decode-{i}", daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> None:
        if self.queue.full():
            self._drop_cancelled()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def _drop_cancelled(self) -> None:
        """Jobs whose clients went away while they waited give their places back: left in the queue
        until a worker skips them, they would turn new requests away (429) behind a long generation."""
        with self.queue.mutex:
            live = [job for job in self.queue.queue if job is None or not job.cancelled.is_set()]
            self.queue.queue.clear()
            self.queue.queue.extend(live)
            self.queue.not_full.notify_all()

    @property
    def waiting(self) -> int:
        self._drop_cancelled()
        return self.queue.qsize() + self.memory.waiting

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self._lock:
                self._jobs.add(job)  # from here cancel_all reaches it, also while it waits for memory
            try:
                if not job.cancelled.is_set() and self.memory.take(job.cache_bytes, job.cancelled):
                    self._run(job)
            finally:
                with self._lock:
                    self._jobs.discard(job)

    def _run(self, job: Job) -> None:
        with self._lock:
            self.running += 1
        try:
            run_job(self.make_engine(job.tools), job)
        except torch.OutOfMemoryError:
            log.warning("generation ran out of memory", exc_info=True)
            torch.cuda.empty_cache()  # what this job held goes back to the card for the next
            job.emit(("error", "out of memory on the card: ask for fewer tokens (max_tokens) or samples (n), "
                               "or start the server with a lower --cache-memory or --max-concurrent"))
        except Exception as error:  # one bad request must not take the worker down
            log.exception("generation failed")
            job.emit(("error", f"generation failed: {type(error).__name__}: {error}"))
        finally:
            self.memory.give_back(job.cache_bytes)
            with self._lock:
                self.running -= 1

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
            job.emit(("error", "the server is shutting down", 503))  # unavailable, not failed: try again later

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
