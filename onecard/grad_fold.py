"""Fold gradients into their CPU accumulation buffers off the autograd thread (recipes with grads=cpu).

Why: folding inside the gradient hook (a device->host copy, then an fp32 add on the CPU) made
backward wait for the bus and the CPU on every parameter; at d32 on an H200 that was 2.7-3.8 s per
micro-batch beyond the GPU's compute. Here the hook only queues work:

  CUDA  a side stream, after waiting for the current one, copies the gradient into a pinned
        staging buffer (non-blocking, in chunks of at most `staging_bytes`) and records an event;
        the gradient's memory is marked as in use by that stream so the allocator does not hand
        it out before the copy is done.
  CPU   the gradient tensor itself is queued (the hook holds the only reference once .grad is
        cleared, so nothing changes it before the worker reads it).

One worker thread then waits for each event and copies (the step's first micro-batch) or adds
(later ones) into the fp32 buffer. One FIFO worker keeps every buffer's folds in hook order, so
the sums are bit-identical to folding inline. At most `staging_buffers` folds are in flight: a
hook that finds none free waits (backpressure), which bounds the pinned memory on CUDA and the
gradients held on the CPU.

drain() waits for everything queued and re-raises what the worker hit; the optimizer drains
only before something reads a buffer (clipping, the update, zeroing), not between micro-batches.
So one micro-batch's folds overlap the rest of its backward and the next micro-batch's forward;
only the last micro-batch's late folds (the first layers, the embedding) are exposed, at the
step's clip.
"""

from __future__ import annotations

import queue
import threading
import weakref
from dataclasses import dataclass

import torch

STAGING_BUFFERS = 4  # folds in flight at once: 4 pinned buffers of STAGING_BYTES on CUDA
STAGING_BYTES = 64 << 20  # one staging buffer; larger gradients go through in chunks
# Elements widened to fp32 at a time when a 16-bit gradient is added on the CPU: 16 MiB, the fastest
# of 1, 4 and 16 MiB in benchmarks/grad_fold_cpu.py (fewer, larger pieces for the thread pool; the
# chunk is written and read back before it leaves the caches).
FOLD_CHUNK = 1 << 22
_local = threading.local()


@dataclass(eq=False)
class _Fold:
    """One queued fold: target <- source (first) or target += source, once `ready` has happened."""

    target: torch.Tensor
    source: torch.Tensor
    first: bool
    ready: torch.cuda.Event | None  # the device->host copy into `source` (CUDA only)
    staging: torch.Tensor | None  # the pool entry to give back (None: not allocated yet)


def fold_into(target: torch.Tensor, source: torch.Tensor, first: bool) -> None:
    """The arithmetic of a fold, exactly as the synchronous code did it: copy, or add in fp32."""
    if first:
        target.copy_(source)
    elif _widens_exactly(source, target):
        _add_widened(target, source)
    else:
        target.add_(source)


def _widens_exactly(source: torch.Tensor, target: torch.Tensor) -> bool:
    """A 16-bit gradient added into a contiguous fp32 buffer in host memory: every 16-bit value is
    exactly an fp32 one, so widening first and then adding gives the bits the mixed add gives."""
    return (target.device.type == "cpu" and source.device.type == "cpu" and target.dtype == torch.float32
            and source.dtype in (torch.bfloat16, torch.float16) and target.is_contiguous()
            and source.numel() == target.numel())


def _add_widened(target: torch.Tensor, source: torch.Tensor) -> None:
    """target += source, widened to fp32 a cache-sized chunk at a time. PyTorch's CPU add_ of a 16-bit
    tensor into an fp32 one converts element by element in a scalar loop; a widening copy and an fp32
    add both vectorize (benchmarks/grad_fold_cpu.py measures the two side by side)."""
    flat_target, flat_source = target.view(-1), source.reshape(-1)
    scratch = _scratch()
    for lo in range(0, flat_target.numel(), FOLD_CHUNK):
        hi = min(lo + FOLD_CHUNK, flat_target.numel())
        widened = scratch[:hi - lo]
        widened.copy_(flat_source[lo:hi])
        flat_target[lo:hi].add_(widened)


def _scratch() -> torch.Tensor:
    """This thread's fp32 chunk for _add_widened (the worker's, or the caller's when folding inline)."""
    if getattr(_local, "scratch", None) is None or _local.scratch.numel() != FOLD_CHUNK:
        _local.scratch = torch.empty(FOLD_CHUNK, dtype=torch.float32)
    return _local.scratch


def _work(pending: queue.Queue, free: queue.Queue, errors: list[Exception]) -> None:
    """The worker thread's loop; it holds no reference to its GradFolder, so that one can be collected."""
    with torch.no_grad():
        while (item := pending.get()) is not None:
            try:
                if item.ready is not None:
                    item.ready.synchronize()
                fold_into(item.target, item.source, item.first)
            except Exception as error:  # handed to drain(), in the caller's thread
                errors.append(error)
            finally:
                free.put(item.staging)
                pending.task_done()
            del item  # don't keep the last gradient and buffer alive while waiting for the next
        pending.task_done()  # the stop sentinel


def _stop(pending: queue.Queue, thread: threading.Thread) -> None:
    pending.put(None)  # after whatever is queued: that still gets folded
    if thread is not threading.current_thread():  # a collection can run on the worker itself
        thread.join()


class GradFolder:
    """Folds (buffer, gradient) pairs handed over by gradient hooks on one background thread."""

    def __init__(self, staging_buffers: int = STAGING_BUFFERS, staging_bytes: int = STAGING_BYTES) -> None:
        if staging_buffers < 1 or staging_bytes < 8:
            raise ValueError(f"need at least one staging buffer of 8 bytes, got {staging_buffers} of {staging_bytes}")
        self.staging_bytes = staging_bytes
        self._pending: queue.Queue[_Fold | None] = queue.Queue()
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(staging_buffers):
            self._free.put(None)  # pinned memory is allocated on first use on CUDA, never on the CPU
        self._errors: list[Exception] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._stopper: weakref.finalize | None = None

    @torch.no_grad()
    def submit(self, target: torch.Tensor, grad: torch.Tensor, first: bool) -> None:
        """Queue target <- grad (first) or target += grad; the caller must drop its own reference
        to grad (.grad = None) and must not read target before drain()."""
        self._start()
        if grad.is_cuda:
            self._submit_cuda(target, grad, first)
        else:
            self._pending.put(_Fold(target, grad, first, None, self._free.get()))

    def _submit_cuda(self, target: torch.Tensor, grad: torch.Tensor, first: bool) -> None:
        flat, out = grad.reshape(-1), target.view(-1)
        side = self._side_stream(grad.device)
        side.wait_stream(torch.cuda.current_stream(grad.device))  # autograd finished writing grad
        step = self.staging_bytes // flat.element_size()
        for lo in range(0, flat.numel(), step):
            hi = min(lo + step, flat.numel())
            staging = self._free.get()  # waits while all are in flight
            if staging is None:
                staging = torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=True)
            view = staging[:(hi - lo) * flat.element_size()].view(flat.dtype)
            with torch.cuda.stream(side):
                view.copy_(flat[lo:hi], non_blocking=True)
                ready = torch.cuda.Event(blocking=True)  # the worker sleeps on it instead of spinning
                ready.record(side)
            self._pending.put(_Fold(out[lo:hi], view, first, ready, staging))
        flat.record_stream(side)  # freed by the caller now, reused only after the copies ran

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _start(self) -> None:
        """Start the worker on first use (and again after close)."""
        if self._stopper is not None and self._stopper.alive:
            return
        thread = threading.Thread(target=_work, args=(self._pending, self._free, self._errors),
                                  name="onecard-grad-fold", daemon=True)
        thread.start()
        self._stopper = weakref.finalize(self, _stop, self._pending, thread)

    def drain(self) -> None:
        """Wait until every queued fold is done; raise the first error the worker hit, if any."""
        self._pending.join()
        if self._errors:
            error = self._errors[0]
            self._errors.clear()
            raise error

    def close(self) -> None:
        """Finish the queued folds and stop the worker (also done when the folder is collected)."""
        if self._stopper is not None:
            self._stopper()
