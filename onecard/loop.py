"""The training loop, the same for every stage that trains: it is given its model, optimizer,
step, batches, evaluator and schedule, and runs steps until the horizon or a stop request,
writing the log, checkpoints and summary as it goes.

A run survives months of interruptions:
- a checkpoint every `save_every_min` minutes and/or `save_every_steps` steps, and at the end
  (checkpoint.py: atomic, checksummed, the last `keep` kept), the log synced to the disk before
  each; a final checkpoint that cannot be written makes the run fail (exit 1), never a silent success;
- SIGINT or SIGTERM stops at the next micro-batch boundary (an unfinished step is abandoned
  and redone on resume) and writes a checkpoint; a second one quits at once. Several ranks stop
  together at the first step boundary where they learn of the request, each leaving the loop on
  the agreed flag alone;
- a non-finite loss or gradient norm skips the step's update; `max_bad_steps` in a row stop
  the run with a checkpoint;
- CUDA running out of memory stops with the planner's breakdown and a leaner recipe to try.

log.jsonl holds one JSON object a line. Step lines (one per optimizer step):

  step              int         optimizer steps done, 1-based (the step-0 line has only
                                step, val_bpb and time)
  loss              float|null  mean training loss of the step's micro-batches; null if not finite
  grad_norm         float|null  gradient norm before clipping; null if not finite
  lr_multiplier     float       the schedule's factor on every learning rate
  skipped           bool        a non-finite loss or gradient norm skipped the update
  step_time_s       float       wall seconds of forward, backward and update
  tokens            int         training tokens of the run so far (all sessions)
  tokens_per_s      float       the step's tokens / step_time_s
  mfu               float|null  model FLOPs/s ÷ the card's dense bf16 peak; null on the CPU
                                or a card the planner's catalog does not know
  vram_bytes        int|null    torch.cuda.memory_allocated() after the step; null on the CPU
  vram_peak_bytes   int|null    torch.cuda.max_memory_allocated() this session; null on the CPU
  host_peak_bytes   int         the process's peak resident memory
  power_w           float|null  the latest NVML power sample, or the stated --power, or null
  energy_kwh        float|null  energy of the run so far; null without NVML and without --power
  energy_estimated  bool        some of energy_kwh comes from --power, not from NVML
  cost              float|null  energy × price, each session's energy at its price (summary.json
                                has the currency)
  wall_s            float       wall seconds of the run so far (all sessions, evaluations and
                                checkpoints included), on the monotonic clock: the time between
                                sessions, a suspended machine and the system clock set back or
                                forth are not counted (nor in eta_s or an energy from --power)
  eta_s             float|null  remaining steps × the recent wall seconds per step
  time              float       Unix time (the system clock's: it jumps where the clock does)
  val_bpb           float       on evaluation steps only: validation bits per byte

Event lines carry "event" instead of "loss": start, resume, checkpoint, checkpoint_failed,
compiled (seconds: the first compiled step, compiling included), compile_failed, stop, end;
each with step and time, and path, message or seconds where there is one. On resume, lines after
the checkpoint's step are dropped, so each step appears once.

summary.json (rewritten at every checkpoint and at the end): status (running | stopped |
finished | failed | interrupted; "running" from the start until the final weights are written, so
a run killed without a word still reads "running"), message, step, steps, val_bpb_start, val_bpb_end (the latest
evaluation), last_checkpoint, prediction (as given to train, or null), compile_s (null when not
compiled), and the meters' totals:
tokens, wall_s, skipped_steps, tokens_per_s_mean, device, gpu, peak_flops, vram_peak_bytes,
host_peak_bytes, energy_kwh, energy_sources (["nvml"], ["estimate"], both, or []),
energy_uncounted_s, stated_power_w, price_per_kwh, currency, cost.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onecard import checkpoint, distributed
from onecard.distributed import SINGLE, World
from onecard.errors import UsageError, quiet_rank
from onecard.meters import Meters, Progress
from onecard.model import GPT
from onecard.optim import Optimizers
from onecard.run import RunConfig, TrainSettings, write_json
from onecard.step import BatchSource, OutOfMemory, TrainStep

# Under torchrun a signal sent to the whole process group (Ctrl-C, systemd, SLURM) reaches each rank
# twice: directly, and forwarded by torchrun a moment later. Within this many seconds it is one request.
ECHO_S = 5.0


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next safe point; a second one quits at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.message = ""
        self.signalled = False
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        several = os.environ.get("WORLD_SIZE", "1") != "1"
        if self.signalled:
            if several and time.monotonic() - self._first_at < ECHO_S:
                return  # the same stop: torchrun forwarding the signal the whole process group had
            raise KeyboardInterrupt  # a checkpoint being written is abandoned; the last complete one stays
        self.signalled, self._first_at = True, time.monotonic()
        name = signal.Signals(signum).name
        again = f"again{f' after {ECHO_S:g} s' if several else ''} to quit at once"
        said = f"{name}: stopping at the next micro-batch and writing a checkpoint ({again})"
        if self.reason:  # a stop under way (non-finite steps, a step limit) keeps its reason and exit code
            said = f"{name}: already stopping ({self.reason}); {again}"
        else:
            self.request("signal", said)
        if not quiet_rank():
            # os.write: printing from a signal handler could re-enter a print the loop is in the middle of
            os.write(sys.stderr.fileno(), f"\n{said}\n".encode())

    def request(self, reason: str, message: str) -> None:
        self.reason, self.message = reason, message


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class Loop:
    """Everything one training session needs; `run()` trains from `step` to `settings.steps`."""
    model: GPT
    opt: Optimizers
    train_step: TrainStep
    batches: BatchSource
    accum: int
    evaluate: Callable[[], float]  # validation bits per byte
    schedule: Callable[[int], float]  # sets the step's learning rates and momentum; returns the lr factor
    config: RunConfig
    meters: Meters | None  # set before run()
    out_of_memory: Callable[[int | None], str]  # the message, given the last saved step
    world: World = SINGLE
    log: Callable[..., None] = print
    step: int = 0
    first_bpb: float | None = None
    last_bpb: float | None = None
    last_saved: int | None = None
    save_error: str | None = None  # the last save's failure, cleared by a later success
    status: str = "running"  # at the horizon still "running" until the final weights are written
    message: str = ""
    history: list[dict] = field(default_factory=list)
    stop_reason: str | None = None  # why a session that did not finish stopped: signal, nonfinite, limit
    log_file: object = None  # log.jsonl, open while the session runs
    last_save_time: float = 0.0
    compile_s: float | None = None  # how long the first compiled step took, compiling included
    dir_id: tuple | None = None  # the run directory's (device, inode), taken when the session starts

    @property
    def settings(self) -> TrainSettings:
        return self.config.train

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    # ------------------------------------------------------------ files

    def write_summary(self) -> dict:
        summary = self.summary()
        if self.world.main and not self.run_dir_lost():
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def summary(self) -> dict:
        return {"status": self.status, "message": self.message, "step": self.step, "steps": self.settings.steps,
                "val_bpb_start": self.first_bpb, "val_bpb_end": self.last_bpb,
                "last_checkpoint": None if self.last_saved is None else f"checkpoints/step_{self.last_saved:06d}",
                "prediction": self.config.prediction.to_dict() if self.config.prediction else None,
                "compile_s": self.compile_s, "ranks": self.world.size,
                **self.meters.summary()}

    def run_dir_lost(self) -> bool:
        """Whether the run directory was deleted or moved away while this session trains in it:
        writing on would make a new directory of a few files, without its tokenizer, log or lock."""
        try:
            st = os.stat(self.run_dir)
        except OSError:
            return True
        if self.dir_id is None:
            self.dir_id = (st.st_dev, st.st_ino)
        return (st.st_dev, st.st_ino) != self.dir_id

    def event(self, kind: str, **extra) -> None:
        self.log_file.write(json.dumps({"event": kind, "step": self.step, "time": time.time(), **extra}) + "\n")
        self.log_file.flush()

    def save_checkpoint(self, last: bool = False) -> None:
        """last: the session ends after this save (the horizon, a stop): no later save tries again."""
        self.last_save_time = time.monotonic()
        optimizer_state = self.opt.state_dict()  # several ranks: each sends rank 0 the states it holds
        if not self.world.main:  # rank 0 writes; the others hold the same weights
            self.last_saved = self.step
            return
        if self.run_dir_lost():
            raise UsageError(f"{self.run_dir} was deleted or moved while training: stopped at "
                             f"step {self.step}, writing nothing more; its checkpoints are wherever the directory went")
        # the log's lines up to this step reach the disk before the checkpoint does: after a power cut the
        # resumed run's log would otherwise lack the steps just before the one it goes on from, for good
        os.fsync(self.log_file.fileno())
        state = {"loader": self.batches.state_dict(), "val_bpb_start": self.first_bpb, "val_bpb_last": self.last_bpb,
                 "totals": self.meters.totals()}
        try:
            path = checkpoint.save(self.run_dir, self.step, self.model, optimizer_state, state,
                                   self.config.to_dict(), self.settings.keep, warn=self.log)
        except checkpoint.CheckpointError as error:
            going_on = "" if last else " Training goes on; the next save tries again."
            self.log(f"warning: {error}; {self.kept()}.{going_on}")
            self.event("checkpoint_failed", message=str(error))
            self.save_error = str(error)
            return
        self.last_saved, self.save_error = self.step, None
        self.event("checkpoint", path=str(path.relative_to(self.run_dir)))
        self.write_summary()

    def kept(self) -> str:
        return "there is no complete checkpoint yet" if self.last_saved is None else \
            f"the last complete checkpoint, step {self.last_saved}, is intact"

    def save_due(self) -> bool:
        every_steps, every_min = self.settings.save_every_steps, self.settings.save_every_min
        by_steps = every_steps and self.step % every_steps == 0
        by_time = every_min and time.monotonic() - self.last_save_time >= 60 * every_min
        if every_min and self.world.size > 1:  # every rank takes part in a save: they agree on when
            by_time = distributed.any_rank(bool(by_time), self.world, self.settings.device)
        return bool(by_steps or by_time)

    # ------------------------------------------------------------ the loop

    def run(self, stop: StopRequest, progress: Progress, log_file, resumed: bool) -> None:
        """Train until the horizon or a stop; the caller holds the run directory and its files."""
        self.log_file, self.last_save_time = log_file, time.monotonic()
        first_step, bad_in_row = self.step, 0
        if not resumed:
            log_file.write(json.dumps({"step": 0, "val_bpb": self.first_bpb, "time": time.time()}) + "\n")
            self.event("start")
        if self.world.main:  # "running" from here: not the last session's word, nor nothing, if this one is killed
            self.write_summary()
        # with several ranks, a signal reaches each at its own moment: they leave the loop on the
        # agreed flag alone, or one rank would wait in the next step's collective for a rank that left
        stopping = self.agreed_stop(stop)
        while self.step < self.settings.steps and not stopping:
            multiplier = self.schedule(self.step)
            started = time.perf_counter()
            try:
                outcome = self.train_step(self.batches, self.accum, lambda: bool(stop.reason))
                if outcome.abandoned:
                    self.log(f"step {self.step + 1} abandoned; it is redone on resume")
                    break
                bad_in_row = bad_in_row + 1 if outcome.skipped else 0
                self.step += 1
                self.record(outcome, multiplier, time.perf_counter() - started, progress)
            except OutOfMemory as error:
                # one card alone: with several, the others are not there to hand over their states
                if error.intact and self.step != self.last_saved and self.step > 0 and self.world.size == 1:
                    self.save_checkpoint(last=True)
                raise UsageError(self.out_of_memory(self.last_saved)) from None
            stopping = self.check_stops(stop, bad_in_row, first_step)
            if self.step < self.settings.steps and not stopping and self.save_due():
                self.save_checkpoint()
        # rank 0's word: its save may have failed where the others' (which only send) did not
        if distributed.from_rank0(self.step != self.last_saved, self.world):
            self.save_checkpoint(last=True)
        finished = self.step >= self.settings.steps
        self.status, self.message = ("running", "") if finished else ("stopped", stop.message)
        if self.save_error:
            self.status, self.message = "failed", f"the last checkpoint could not be written: {self.save_error}"
        self.event("end" if finished and not self.save_error else "stop", message=self.message)

    def record(self, outcome, multiplier: float, seconds: float, progress: Progress) -> None:
        """The step's log line, the evaluation when due, and the progress display."""
        settings = self.settings
        record = {"step": self.step, "loss": finite(outcome.loss), "grad_norm": finite(outcome.grad_norm),
                  "lr_multiplier": multiplier, "skipped": outcome.skipped}
        record.update(self.meters.step(self.step, outcome.tokens, seconds, outcome.skipped))
        if outcome.compile_s is not None:
            self.compile_s = outcome.compile_s
            self.event("compiled", seconds=outcome.compile_s)
        if self.step == settings.steps or (settings.eval_every > 0 and self.step % settings.eval_every == 0):
            try:
                self.last_bpb = record["val_bpb"] = self.evaluate()
            except torch.OutOfMemoryError as error:  # the step itself is whole: saved, then the advice
                torch.cuda.empty_cache()
                raise OutOfMemory(error) from None
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        self.history.append(record)
        progress.update(self.step, record)
        if outcome.skipped:
            self.log(f"warning: step {self.step}: loss {outcome.loss} / gradient norm {outcome.grad_norm} is not "
                     "finite; the update was skipped")

    def check_stops(self, stop: StopRequest, bad_in_row: int, first_step: int) -> bool:
        """Ask for a stop where one is due; True on every rank when any rank is stopping."""
        if bad_in_row >= self.settings.max_bad_steps:
            stop.request("nonfinite", f"{bad_in_row} steps in a row had a non-finite loss or gradient "
                                      "norm: stopped. Lower the learning rates or check the data")
        if self.settings.stop_after and self.step - first_step >= self.settings.stop_after:
            stop.request("limit", f"stopped after {self.settings.stop_after} steps of this session")
        return self.agreed_stop(stop)

    def agreed_stop(self, stop: StopRequest) -> bool:
        if not distributed.any_rank(bool(stop.reason), self.world, self.settings.device):
            return False
        if not stop.reason:
            stop.request("signal", "another rank was asked to stop: stopping with it")
        return True
