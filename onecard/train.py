"""The training loop: nanochat's base-training recipe on whatever Recipe the run was given.

One optimizer step = `accum` micro-batches of (micro_batch × seq_len) tokens, so that each
step sees `total_batch` tokens. Learning rate constant then linear decay over the last 20 %;
Muon momentum warms from 0.85 to 0.95; gradients clipped at 1.0. Validation bits per byte
every `eval_every` steps.

A run survives months of interruptions:
- a checkpoint every `save_every_min` minutes and/or `save_every_steps` steps, and at the end
  (checkpoint.py: atomic, checksummed, the last `keep` kept);
- a run directory that holds a checkpoint resumes from it, bitwise exactly on the CPU (weights,
  optimizer states, data position and every RNG state are restored); a different model,
  sequence length, batch, seed or corpus is refused unless `force_new` (another recipe is
  allowed: weights and optimizer states convert);
- SIGINT or SIGTERM stops at the next micro-batch boundary (an unfinished step is abandoned
  and redone on resume) and writes a checkpoint; a second one quits at once;
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
  cost              float|null  energy_kwh × price (summary.json has the currency)
  wall_s            float       wall seconds of the run so far (all sessions, evaluations and
                                checkpoints included)
  eta_s             float|null  remaining steps × the recent wall seconds per step
  time              float       Unix time
  val_bpb           float       on evaluation steps only: validation bits per byte

Event lines carry "event" instead of "loss": start, resume, checkpoint, checkpoint_failed,
compile_failed, stop, end; each with step and time, and path or message where there is one. On resume, lines
after the checkpoint's step are dropped, so each step appears once.

summary.json (rewritten at every checkpoint and at the end): status (running | stopped |
finished | failed | interrupted), message, step, steps, val_bpb_start, val_bpb_end (the latest
evaluation), last_checkpoint, prediction (as given to train, or null), and the meters' totals:
tokens, wall_s, skipped_steps, tokens_per_s_mean, device, gpu, peak_flops, vram_peak_bytes,
host_peak_bytes, energy_kwh, energy_sources (["nvml"], ["estimate"], both, or []),
energy_uncounted_s, stated_power_w, price_per_kwh, currency, cost.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from onecard import checkpoint, distributed
from onecard.data import Corpus, TokenLoader
from onecard.distributed import SINGLE, World
from onecard.errors import UsageError
from onecard.meters import Meters, PowerMeter, Progress, nvml_power_reader
from onecard.model import GPT, GPTConfig, build_model
from onecard.optim import Optimizers, build_optimizer, lr_multiplier, muon_momentum
from onecard.plan.memory import predict_memory
from onecard.plan.search import breakdown
from onecard.recipe import Recipe
from onecard.tokenizer import Tokenizer

# From the plain nanochat way towards the leanest in memory: what to try after running out.
LEANER = ("baseline", "recompute", "bf16", "lean", "offload-states", "offload", "offload-max")


@dataclass
class TrainSettings:
    run_dir: Path
    steps: int
    total_batch: int
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 50
    eval_batches: int = 8
    sample_tokens: int = 48
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    grad_clip: float = 1.0
    sample_prompt: str = ""
    data: str | None = None  # the corpus as given (None: embedded), so that a resume finds it again
    save_every_min: float = 30.0  # checkpoint every so many minutes (0: off) ...
    save_every_steps: int = 0  # ... and/or every so many steps (0: off); always at the end
    keep: int = 3  # checkpoints kept
    force_new: bool = False  # start over even though the run directory holds a checkpoint
    price: float | None = None  # per kWh
    currency: str = "USD"
    power_watts: float | None = None  # stated power for an energy estimate when NVML cannot measure
    max_bad_steps: int = 5  # non-finite steps in a row that stop the run
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this session


def grad_accum_steps(total_batch: int, micro_batch: int, seq_len: int, ranks: int = 1) -> int:
    """Micro-batches per step on each rank; total_batch must be a whole number of them on every rank."""
    per_micro = micro_batch * seq_len * ranks
    if total_batch <= 0:
        raise UsageError(f"--total-batch must be positive, got {total_batch}")
    if total_batch % per_micro:
        lower = max(per_micro, total_batch // per_micro * per_micro)
        ranks_part = (" × ranks", f" × {ranks}") if ranks > 1 else ("", "")
        raise UsageError(f"--total-batch {total_batch} is not a multiple of micro-batch × seq-len{ranks_part[0]} = "
                         f"{micro_batch} × {seq_len}{ranks_part[1]} = {per_micro}: use {lower} or {lower + per_micro}")
    return total_batch // per_micro


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but this PyTorch sees no CUDA GPU: use --device cpu, "
                         "or install the CUDA build of PyTorch (see README)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}: use cpu, cuda or auto")
    return name


def autocast_for(device: str):
    """bf16 autocast on CUDA as nanochat does; plain float32 on the CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_bpb(model: GPT, batches, token_bytes: torch.Tensor, device: str) -> float:
    """Bits per byte: summed cross-entropy (nats) over the bytes the targets stand for.

    Special tokens (0 bytes) and ignored targets (-1) count neither loss nor bytes, so the figure
    does not depend on the vocabulary size.
    """
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    token_bytes = token_bytes.to(device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_for(device):
            loss = model(inputs, targets, loss_reduction="none").view(-1)
        flat = targets.reshape(-1)
        nbytes = torch.where(flat >= 0, token_bytes[flat.clamp(min=0)], 0)
        total_nats += (loss.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if total_bytes.item() == 0:
        raise ValueError("validation set has no bytes to score")
    return (total_nats / (math.log(2) * total_bytes)).item()


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt, prepend_bos=True)
    out = []
    # under the same autocast as training: on CUDA the embedding is bf16 and the other weights may be fp32
    with autocast_for(model.lm_head.weight.device.type):
        for token in model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, seed=seed):
            if token == tokenizer.bos_id:
                break
            out.append(token)
    model.train(was_training)
    return prompt + tokenizer.decode(out)


def save_run(run_dir: Path, model: GPT, config: dict) -> None:
    """Final weights (in the dtypes they were trained in) as model.safetensors, and config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = run_dir / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(run_dir / "model.safetensors")
    write_json(run_dir / "config.json", config)


def write_json(path: Path, data: dict) -> None:
    """Replace a small JSON file atomically: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- starting over or resuming

def run_config(model_config: GPTConfig, recipe: Recipe, settings: TrainSettings, corpus: Corpus, model: GPT,
               prediction: dict | None) -> dict:
    return {
        "model_config": model_config.to_dict(),
        "recipe": recipe.to_dict(),
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "corpus": corpus.describe(),
        "params": model.num_params(),
        "flops_per_token": model.estimate_flops(),
        "prediction": prediction,
    }


# What a resumed run must share with the run that wrote the checkpoint. The rest may change
# between sessions: steps, device, evaluation, saving, price, power, and the recipe's memory
# choices and micro-batch (weights and optimizer states convert; the math is the same, the
# rounding is not bitwise).
SAME_TRAIN = ("total_batch", "seed", "matrix_lr", "embedding_lr", "unembedding_lr", "grad_clip")


def conflicts(saved: dict, config: dict) -> list[str]:
    """How `config` differs from the checkpoint's config where a resume cannot follow."""
    out = [f"model {key} {saved['model_config'].get(key)} -> {value}"
           for key, value in config["model_config"].items() if saved["model_config"].get(key) != value]
    if saved["recipe"]["seq_len"] != config["recipe"]["seq_len"]:
        out.append(f"seq_len {saved['recipe']['seq_len']} -> {config['recipe']['seq_len']}")
    for key in SAME_TRAIN:
        if saved["train"].get(key) != config["train"][key]:
            out.append(f"{key} {saved['train'].get(key)} -> {config['train'][key]}")

    def fingerprint(text: str) -> str:  # not the path: a corpus may move to another disk
        found = re.search(r"fingerprint \w+, validation fraction \S+", text)
        return found.group(0) if found else text
    if fingerprint(saved["corpus"]) != fingerprint(config["corpus"]):
        out.append(f"corpus {saved['corpus']} -> {config['corpus']}")
    return out


def set_aside(run_dir: Path) -> Path:
    """Move an earlier run's files into run_dir/previous-<time>/: --force-new deletes nothing."""
    aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in run_dir.iterdir():
        if path != aside and not path.name.startswith("previous-"):
            path.rename(aside / path.name)
    return aside


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines a crashed session wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by the crash
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


# ---------------------------------------------------------------- signals and faults

class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next safe point; a second one quits at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.message = ""
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
        if self.reason == "signal":
            raise KeyboardInterrupt  # a checkpoint being written is abandoned; the last complete one stays
        name = signal.Signals(signum).name
        self.request("signal", f"{name}: stopping at the next micro-batch and writing a checkpoint "
                               "(again to quit at once)")
        # os.write: printing from a signal handler could re-enter a print the loop is in the middle of
        os.write(sys.stderr.fileno(), f"\n{self.message}\n".encode())

    def request(self, reason: str, message: str) -> None:
        self.reason, self.message = reason, message


def leaner_recipe(recipe: Recipe) -> str:
    name = recipe.name if recipe.name in LEANER else "baseline"
    return LEANER[min(LEANER.index(name) + 1, len(LEANER) - 1)]


def out_of_memory_message(model_config: GPTConfig, recipe: Recipe, device: str, saved: int | None) -> str:
    """What ran out, the planner's breakdown of where the memory goes, and what to try next."""
    lines = [f"CUDA ran out of memory training with recipe {recipe.name} "
             f"(micro-batch {recipe.micro_batch}, seq-len {recipe.seq_len})"]
    if saved:
        lines[0] += f"; step {saved} is saved, and resuming with a leaner recipe goes on from there"
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        lines.append(f"  measured: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated of the "
                     f"card's {total / 2**30:.2f} GiB")
    lines.append(f"  planner's prediction: {breakdown(predict_memory(model_config, recipe))}")
    smaller = f" or --micro-batch {recipe.micro_batch // 2}" if recipe.micro_batch > 1 else ""
    lines.append(f"  try --recipe {leaner_recipe(recipe)}{smaller} (the same total batch, more accumulation); "
                 f"`onecard plan --model d{model_config.n_layer} --gpu <your card>` shows what fits")
    return "\n".join(lines)


def forward_backward(model: torch.nn.Module, opt: Optimizers, loader: TokenLoader, accum: int, device: str,
                     stop: StopRequest, world: World = SINGLE) -> float | None:
    """This rank's micro-batches of the step; the mean loss, or None when a stop request came in
    between (on one card: with several, ranks stop together at step boundaries)."""
    # summed on the device and read once per step: reading each micro-batch's loss would make the
    # CPU wait for the GPU every micro-batch instead of queueing the next one's work
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro in range(accum):
        if micro and stop.reason and world.size == 1:
            return None
        # the ranks take turns through one stream, so every rank's loader stays at the same place
        batches = [loader.next_batch() for _ in range(world.size)]
        inputs, targets = (t.to(device) for t in batches[world.rank])
        with autocast_for(device):
            loss = model(inputs, targets)
        (loss / accum).backward()
        opt.accumulate()
        loss_sum += loss.detach()
    return loss_sum.item() / accum


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------- the loop

def train(model_config: GPTConfig, tokenizer: Tokenizer, corpus: Corpus, recipe: Recipe,
          settings: TrainSettings, model: GPT | None = None, log=print, prediction: dict | None = None,
          world: World = SINGLE) -> dict:
    """Train, or resume from the run directory's checkpoint, and save.

    prediction: the planner's forecast for this run ({"peak_bytes": ..., "step_time_s": ...}),
    stored in config.json and summary.json so that the report sets it beside the measurement.
    Returns the model, val_bpb_start/val_bpb_end, the sample, this session's history, and
    `stopped` (None when the run finished; "signal", "nonfinite" or "limit") with a message.
    With several ranks (onecard/distributed.py) every rank trains and rank 0 alone writes and logs.
    """
    device = settings.device
    main = world.main
    if not main:
        log = _quiet
    accum = grad_accum_steps(settings.total_batch, recipe.micro_batch, recipe.seq_len, world.size)
    if recipe.seq_len > model_config.sequence_len:
        raise UsageError(f"seq-len {recipe.seq_len} exceeds the model's context {model_config.sequence_len}")
    run_dir = settings.run_dir
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if settings.force_new and any(p for p in run_dir.iterdir() if not p.name.startswith("previous-")):
            log(f"--force-new: the earlier run's files are moved to {set_aside(run_dir)}")
    found = None
    for finding in (True, False):  # rank 0 first: finding may set a damaged checkpoint aside
        if finding == main and not settings.force_new:
            try:
                found = checkpoint.find_latest(run_dir, warn=log)
            except checkpoint.CheckpointError as error:
                raise UsageError(str(error)) from None
        distributed.barrier(world)

    torch.manual_seed(settings.seed)
    if model is None:
        model = build_model(model_config, device=device)
    else:
        model.to(device)
    model.set_policies(recipe.activations, recipe.loss)
    config = run_config(model_config, recipe, settings, corpus, model, prediction)
    if found:
        problems = conflicts(found.config, config)
        if problems:
            raise UsageError(f"{run_dir} holds a run this one does not match ({'; '.join(problems)}): "
                             "resume it with its own settings, or start over with --force-new")
        if found.step >= settings.steps:
            raise UsageError(f"the run in {run_dir} is at step {found.step} of {settings.steps}: give --steps "
                             "above that to train further, or --force-new to start over")
        checkpoint.load_weights(found, model)  # before the optimizer: a cpu_master recipe copies them
    opt = build_optimizer(model, recipe, matrix_lr=settings.matrix_lr, embedding_lr=settings.embedding_lr,
                          unembedding_lr=settings.unembedding_lr)
    loader = TokenLoader(corpus, tokenizer, recipe.micro_batch, recipe.seq_len, split="train",
                         seed=settings.seed)
    # the compiled module shares the model's parameters; evaluation, sampling and saving use the model
    step_model = torch.compile(model) if recipe.compile else model
    token_bytes = tokenizer.token_bytes()

    def validation_bpb() -> float:
        val = TokenLoader(corpus, tokenizer, recipe.micro_batch, recipe.seq_len, split="val")
        model.eval()
        bpb = evaluate_bpb(model, (val.next_batch() for _ in range(settings.eval_batches)), token_bytes, device)
        model.train()
        return bpb

    log_path = run_dir / "log.jsonl"
    if found:
        opt.load_state_dict(checkpoint.read_optimizer(found))
        loader.load_state_dict(found.state["loader"])
        step, first_bpb, last_bpb = found.step, found.state["val_bpb_start"], found.state["val_bpb_last"]
        if main:
            truncate_log(log_path, step)
        log(f"resuming from step {step} of {settings.steps} ({found.path.relative_to(run_dir)})")
        if found.config["train"]["steps"] != settings.steps:
            log(f"note: the run was planned for {found.config['train']['steps']} steps, now {settings.steps}: "
                "the learning-rate schedule follows the new horizon")
        if found.config["recipe"] != config["recipe"]:
            log(f"note: the recipe changed from {found.config['recipe']} to {config['recipe']}: weights and "
                "optimizer states are converted; the run goes on, not bitwise as it would have")
    else:
        if main:
            tokenizer.save(run_dir / "tokenizer")
            log_path.write_text("")
        step = 0
        first_bpb = last_bpb = validation_bpb()
        log(f"step 0: validation {first_bpb:.4f} bits per byte")
    if main:
        write_json(run_dir / "config.json", config)

    power = PowerMeter(nvml_power_reader(device), settings.power_watts)
    meters = Meters(device, model.estimate_flops(), settings.steps, power, settings.price, settings.currency,
                    totals=found.state["totals"] if found else None, cards=world.size,
                    sum_over_cards=None if world.size == 1 else lambda j: distributed.total(j, world, device))
    if power.source is None:
        log("energy: no power reading (NVML) here; give --power WATTS for an estimate, else it is not reported")
    elif power.source == "estimate":
        log(f"energy: estimated from --power {settings.power_watts:g} W (no NVML reading)")

    first_step = step
    last_saved = found.step if found else None
    last_save_time = time.monotonic()
    history: list[dict] = []
    stop = StopRequest()
    status, message = "failed", ""

    def write_summary() -> dict:
        summary = {"status": status, "message": message, "step": step, "steps": settings.steps,
                   "val_bpb_start": first_bpb, "val_bpb_end": last_bpb,
                   "last_checkpoint": None if last_saved is None else f"checkpoints/step_{last_saved:06d}",
                   "prediction": prediction, **meters.summary()}
        if main:
            write_json(run_dir / "summary.json", summary)
        return summary

    def event(log_file, kind: str, **extra) -> None:
        log_file.write(json.dumps({"event": kind, "step": step, "time": time.time(), **extra}) + "\n")
        log_file.flush()

    def save_checkpoint(log_file) -> None:
        nonlocal last_saved, last_save_time
        if not main:  # rank 0 writes; the others hold the same weights and states
            last_saved, last_save_time = step, time.monotonic()
            return
        state = {"loader": loader.state_dict(), "val_bpb_start": first_bpb, "val_bpb_last": last_bpb,
                 "lr_multiplier": lr_multiplier(step, settings.steps), "muon_momentum": muon_momentum(step),
                 "totals": meters.totals()}
        last_save_time = time.monotonic()
        try:
            path = checkpoint.save(run_dir, step, model, opt.state_dict(), state, config, settings.keep)
        except checkpoint.CheckpointError as error:
            kept = "there is no complete checkpoint yet" if last_saved is None else \
                f"the last complete checkpoint, step {last_saved}, is intact"
            log(f"warning: {error}; {kept}. Training goes on; the next save tries again.")
            event(log_file, "checkpoint_failed", message=str(error))
            return
        last_saved = step
        event(log_file, "checkpoint", path=str(path.relative_to(run_dir)))
        write_summary()

    def save_due() -> bool:
        by_steps = settings.save_every_steps and step % settings.save_every_steps == 0
        by_time = settings.save_every_min and time.monotonic() - last_save_time >= 60 * settings.save_every_min
        return bool(by_steps or by_time)

    power.start()
    try:
        with stop, (log_path if main else Path(os.devnull)).open("a") as log_file, \
                Progress(settings.steps, currency=settings.currency, start_step=step,
                         stream=None if main else log_file) as progress:
            if found:
                event(log_file, "resume", path=str(found.path.relative_to(run_dir)))
                checkpoint.set_rng_state(*checkpoint.read_rng(found))
            else:
                log_file.write(json.dumps({"step": 0, "val_bpb": first_bpb, "time": time.time()}) + "\n")
                event(log_file, "start")
            bad_in_row = 0
            compiled_ok = False  # a compiled model that ran one step is trusted from then on
            while step < settings.steps and not stop.reason:
                at_start = checkpoint.rng_state(), loader.state_dict()
                multiplier = lr_multiplier(step, settings.steps)
                opt.set_lr_multiplier(multiplier)
                opt.set_muon_momentum(muon_momentum(step))
                started = time.perf_counter()
                try:
                    loss = forward_backward(step_model, opt, loader, accum, device, stop, world)
                except torch.OutOfMemoryError:
                    # the weights are untouched: go back to the step's start and keep what was done
                    opt.zero_grad()
                    torch.cuda.empty_cache()
                    checkpoint.set_rng_state(*at_start[0])
                    loader.load_state_dict(at_start[1])
                    if step != last_saved and step > 0:
                        save_checkpoint(log_file)
                    raise UsageError(out_of_memory_message(model_config, recipe, device, last_saved)) from None
                except Exception as error:
                    if step_model is model or compiled_ok:
                        raise
                    # torch.compile failed on its first step: back to the step's start, go on uncompiled
                    opt.zero_grad()
                    checkpoint.set_rng_state(*at_start[0])
                    loader.load_state_dict(at_start[1])
                    first_line = (str(error).strip().splitlines() or [""])[0][:200]
                    log(f"warning: torch.compile failed ({type(error).__name__}: {first_line}); "
                        "training goes on uncompiled (slower, the same math)")
                    event(log_file, "compile_failed", message=f"{type(error).__name__}: {first_line}")
                    step_model = model
                    continue
                compiled_ok = True
                if loss is None:  # stopped between micro-batches: abandon the step, redo it on resume
                    opt.zero_grad()
                    checkpoint.set_rng_state(*at_start[0])
                    loader.load_state_dict(at_start[1])
                    log(f"step {step + 1} abandoned; it is redone on resume")
                    break
                if world.size > 1:  # every rank applies the update of the whole step's gradients
                    distributed.average(opt.gradients(), world)
                    loss = distributed.mean(loss, world, device)
                grad_norm = float(opt.clip_grad_norm(settings.grad_clip))
                skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
                if not skipped:
                    opt.step()
                opt.zero_grad()
                bad_in_row = bad_in_row + 1 if skipped else 0
                step += 1
                record = {"step": step, "loss": finite(loss), "grad_norm": finite(grad_norm),
                          "lr_multiplier": multiplier, "skipped": skipped}
                record.update(meters.step(step, settings.total_batch, time.perf_counter() - started, skipped))
                if step == settings.steps or (settings.eval_every > 0 and step % settings.eval_every == 0):
                    last_bpb = record["val_bpb"] = validation_bpb()
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                history.append(record)
                progress.update(step, record)
                if skipped:
                    log(f"warning: step {step}: loss {loss} / gradient norm {grad_norm} is not finite; "
                        f"the update was skipped ({bad_in_row} in a row)")
                if bad_in_row >= settings.max_bad_steps:
                    stop.request("nonfinite", f"{bad_in_row} steps in a row had a non-finite loss or gradient "
                                              "norm: stopped. Lower the learning rates or check the data")
                if settings.stop_after and step - first_step >= settings.stop_after:
                    stop.request("limit", f"stopped after {settings.stop_after} steps of this session")
                if distributed.any_rank(bool(stop.reason), world, device) and not stop.reason:
                    stop.request("signal", "another rank was asked to stop: stopping with it")
                if step < settings.steps and not stop.reason and save_due():
                    save_checkpoint(log_file)
            if step != last_saved:
                save_checkpoint(log_file)
            finished = step >= settings.steps
            status, message = ("finished", "") if finished else ("stopped", stop.message)
            event(log_file, "end" if finished else "stop", message=message)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as error:
        message = str(error)
        raise
    finally:
        power.stop()
        write_summary()

    sample = None
    if finished and main:
        sample = sample_text(model, tokenizer, settings.sample_prompt, settings.sample_tokens, seed=settings.seed)
        config["results"] = {"val_bpb_start": first_bpb, "val_bpb_end": last_bpb, "steps": step,
                             "tokens": meters.tokens, "sample": sample}
        save_run(run_dir, model, config)
    return {"model": model, "val_bpb_start": first_bpb, "val_bpb_end": last_bpb, "sample": sample,
            "history": history, "run_dir": run_dir, "step": step, "stopped": None if finished else stop.reason,
            "message": message, "last_checkpoint": last_saved, "summary": write_summary()}
