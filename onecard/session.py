"""One training session in a run directory, for every stage that trains: find the checkpoint to
resume, check that it matches, restore it, set up the meters and files, run the loop (loop.py),
and save the final weights. The stage brings its model, optimizer, batches, evaluator and schedule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

from onecard import checkpoint, distributed, durable, eval_results
from onecard.distributed import World
from onecard.engine import sample_text
from onecard.errors import UsageError, one_line
from onecard.family import build_model, build_optimizer
from onecard.loop import Loop, StopRequest
from onecard.meters import Meters, PowerMeter, Progress, nvml_power_reader
from onecard.model import GPT
from onecard.model_config import GPTConfig
from onecard.optim import Optimizers
from onecard.plan.choose import Prediction
from onecard.plan.memory import predict_memory
from onecard.plan.search import breakdown
from onecard.recipe import Recipe
from onecard.rng import set_rng_state
from onecard.run import (
    RunConfig,
    TrainSettings,
    conflicts,
    model_conflicts,
    read_config,
    set_aside,
    truncate_log,
    write_json,
)
from onecard.step import TrainStep

# From the plain nanochat way towards the leanest in memory: what to try after running out.
LEANER = ("baseline", "recompute", "bf16", "lean", "offload-states", "offload", "offload-max")


def leaner_recipe(recipe: Recipe) -> str:
    name = recipe.name if recipe.name in LEANER else "baseline"
    return LEANER[min(LEANER.index(name) + 1, len(LEANER) - 1)]


def out_of_memory_message(model_config: GPTConfig, recipe: Recipe, device: str, saved: int | None,
                          shards: int = 1) -> str:
    """What ran out, the planner's breakdown of where the memory goes, and what to try next."""

    lines = [f"CUDA ran out of memory training with recipe {recipe.name} "
             f"(micro-batch {recipe.micro_batch}, seq-len {recipe.seq_len})"]
    if saved:
        lines[0] += f"; step {saved} is saved, and resuming with a leaner recipe goes on from there"
    if device == "cuda":
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory  # this rank's card
        lines.append(f"  measured: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated of the "
                     f"card's {total / 2**30:.2f} GiB")
    lines.append(f"  planner's prediction: {breakdown(predict_memory(model_config, recipe, shards=shards))}")
    smaller = f" or --micro-batch {recipe.micro_batch // 2}" if recipe.micro_batch > 1 else ""
    lines.append(f"  try --recipe {leaner_recipe(recipe)}{smaller} (the same total batch, more accumulation); "
                 f"`onecard plan --model d{model_config.n_layer} --gpu <your card>` shows what fits")
    return "\n".join(lines)


def find_checkpoint(settings: TrainSettings, world: World, log: Callable[..., None]) -> checkpoint.Found | None:
    """The checkpoint to resume from (None: a new run). --force-new sets the earlier run aside first."""
    run_dir = settings.run_dir
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if settings.force_new and any(not p.name.startswith(("previous-", ".lock")) for p in run_dir.iterdir()):
            log(f"--force-new: the earlier run's files are moved to {set_aside(run_dir)}")
    def find() -> checkpoint.Found | None:
        if settings.force_new:
            return None
        try:
            found = checkpoint.find_latest(run_dir, warn=log)
        except checkpoint.CheckpointError as error:
            raise UsageError(str(error)) from None
        if found is None:
            refuse_finished_without_checkpoint(run_dir)
        if found is None and any((run_dir / name).exists() for name in ("log.jsonl", "summary.json")):
            log(f"{run_dir} holds a run stopped before its first checkpoint: starting it over; its files are "
                f"moved to {set_aside(run_dir, only_run_files=True)}")  # its log, kept, says how far it got
        return found
    # rank 0 alone looks (it may set a damaged checkpoint aside, and verifying reads every byte once) and every
    # rank resumes from what it found; its refusal stops them all, not only rank 0
    found = distributed.decided_by_rank0(find, world)
    return found


def run_config(model: GPT, recipe: Recipe, settings: TrainSettings, data_label: str, prediction: Prediction | None,
               stage: str = "pretrain", init_from: str | None = None) -> RunConfig:
    return RunConfig(model_config=model.config, recipe=recipe, train=settings, corpus=data_label,
                     params=model.num_params(), flops_per_token=model.estimate_flops(), prediction=prediction,
                     stage=stage, init_from=init_from)


def prepare(model_config: GPTConfig, recipe: Recipe, settings: TrainSettings, data_label: str,
            prediction: Prediction | None, model: GPT | None, world: World, log: Callable[..., None],
            stage: str = "pretrain", init_from: str | None = None
            ) -> tuple[checkpoint.Found | None, GPT, RunConfig, Optimizers]:
    """The checkpoint to resume (checked against this run), the model on its device with the
    recipe's policies (and the checkpoint's weights), the run's config, and its optimizer."""
    found = find_checkpoint(settings, world, log)
    saved = RunConfig.from_dict(found.config, f"{found.path}/config.json") if found else None
    if saved:  # the model first, before it is built: a damaged config.json could ask for any size
        refuse_conflicts(settings.run_dir, model_conflicts(saved.model_config, model_config))
    settings.eval_rows = validation_rows(settings, recipe, saved)
    scored = validation_rows(saved.train, saved.recipe, saved) if saved else None  # the run's own rows
    if scored is not None and settings.eval_rows != scored:
        log(f"note: --eval-batches {settings.eval_batches} scores {settings.eval_rows} validation rows where the run "
            f"scored {scored}: bits per byte from here on are not comparable with the earlier ones, step 0's included")
    torch.manual_seed(settings.seed)
    model = build_model(model_config, device=settings.device) if model is None else model.to(settings.device)
    model.set_policies(recipe.activations, recipe.loss)
    config = run_config(model, recipe, settings, data_label, prediction, stage, init_from)
    if found:
        check_resume(found, saved, config)
        checkpoint.load_weights(found, model)  # before the optimizer: a cpu_master recipe copies them
    opt = build_optimizer(model, recipe, matrix_lr=settings.matrix_lr, embedding_lr=settings.embedding_lr,
                          unembedding_lr=settings.unembedding_lr, total_batch=settings.total_batch,
                          fine_tune=settings.lr_fraction if stage == "sft" else None, world=world)
    return found, model, config, opt


def validation_rows(settings: TrainSettings, recipe: Recipe, saved: RunConfig | None) -> int:
    """Rows per evaluation: the run's own (older runs: eval_batches x their micro-batch), unless
    --eval-batches changes; else eval_batches x this micro-batch."""
    if saved and saved.train.eval_batches == settings.eval_batches:
        return saved.train.eval_rows or saved.train.eval_batches * saved.recipe.micro_batch
    return settings.eval_batches * recipe.micro_batch


def check_resume(found: checkpoint.Found, saved: RunConfig, config: RunConfig) -> None:
    """Refuse a resume the checkpoint (whose config is `saved`) cannot follow, in one line that
    says what differs."""
    run_dir = config.train.run_dir
    refuse_conflicts(run_dir, conflicts(saved, config))
    if found.step >= config.train.steps and not (found.step == config.train.steps and not final_written(run_dir)):
        raise UsageError(f"the run in {run_dir} is at step {found.step} of {config.train.steps}: give --steps "
                         "above that to train further, or --force-new to start over")


def saved_run_config(run_dir: Path) -> RunConfig | None:
    """The RunConfig of the run a directory holds, if it has a checkpoint to resume from."""
    if not checkpoint.has_checkpoint(run_dir):
        return None
    # written at each session's start; each checkpoint keeps a copy, read where that one is missing or damaged
    errors = []
    copies = [path / "config.json" for _, path in reversed(checkpoint.step_dirs(run_dir))]
    for path in (run_dir / "config.json", *copies):  # the newest checkpoint may be the damaged one
        try:
            return read_config(path)
        except UsageError as error:
            errors.append(str(error))
    raise UsageError(f"{'; '.join(errors)}: start over with --force-new") from None


def final_written(run_dir: Path) -> bool:
    """Whether the run's final weights are written: save_final writes config.json with the results
    after model.safetensors. A run stopped between its last checkpoint and these is finished on resume."""
    try:
        results = read_config(run_dir / "config.json").results
    except UsageError:
        return False
    return (run_dir / "model.safetensors").is_file() and results is not None


def refuse_finished_without_checkpoint(run_dir: Path) -> None:
    """A finished run whose checkpoints were deleted has nothing to go on from (called before a tokenizer
    is trained for nothing, and again when the checkpoint is looked for)."""
    if final_written(run_dir):
        raise UsageError(f"{run_dir} holds a finished run without a checkpoint to continue from: start over with "
                         "--force-new, or give another --run-dir")


def refuse_conflicts(run_dir: Path, problems: list[str]) -> None:
    if problems:
        raise UsageError(f"{run_dir} holds a run this one does not match ({'; '.join(problems)}): "
                         "resume it with its own settings, or start over with --force-new")


def save_final(run_dir: Path, model: GPT, config: RunConfig) -> None:
    """Final weights (in the dtypes they were trained in) as model.safetensors, and config.json. The
    weights carry their step: a resumed run rewrites config.json long before it writes new weights."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = run_dir / "model.safetensors.tmp"
    durable.save_tensors(state, tmp, metadata={"step": str(config.results["steps"])})
    # the scores of the weights these replace (a finished run trained further): report would show them as these
    (run_dir / eval_results.FILE).unlink(missing_ok=True)
    durable.replace(tmp, run_dir / "model.safetensors")  # before config.json says the run is finished
    write_json(run_dir / "config.json", config.to_dict())


def _restore(loop: Loop, found: checkpoint.Found, config: RunConfig, log: Callable[..., None]) -> None:
    loop.opt.load_state_dict(checkpoint.read_optimizer(found))
    # an owner may have set its weights from the checkpoint's fp32 master copy (a cpu_master run
    # resumed with another recipe), which the other ranks do not read: they take the owner's
    loop.opt.broadcast_weights()
    loop.batches.load_state_dict(found.state["loader"])
    loop.step, loop.first_bpb, loop.last_bpb = found.step, found.state["val_bpb_start"], found.state["val_bpb_last"]
    loop.last_saved = found.step
    run_dir, settings = config.train.run_dir, config.train
    if loop.world.main:
        truncate_log(run_dir / "log.jsonl", loop.step)
    log(f"resuming from step {loop.step} of {settings.steps} ({found.path.relative_to(run_dir)})")
    saved = found.config
    if saved["train"]["steps"] != settings.steps:
        log(f"note: the run was planned for {saved['train']['steps']} steps, now {settings.steps}: "
            "the learning-rate schedule follows the new horizon")
    if saved["recipe"] != config.recipe.to_dict():
        log(f"note: the recipe changed from {saved['recipe']} to {config.recipe.to_dict()}: weights and "
            "optimizer states are converted; the run goes on, not bitwise as it would have")


def _meters(settings: TrainSettings, model: GPT, found, world: World, log: Callable[..., None]) -> Meters:
    device = settings.device
    power = PowerMeter(nvml_power_reader(device), settings.power_watts)
    if power.source is None:
        log("energy: no power reading (NVML) here; give --power WATTS for an estimate, else it is not reported")
    elif power.source == "estimate":
        log(f"energy: estimated from --power {settings.power_watts:g} W (no NVML reading)")
    return Meters(device, model.estimate_flops(), settings.steps, power, settings.price, settings.currency,
                  totals=found.state["totals"] if found else None, cards=world.size,
                  sum_over_cards=None if world.size == 1 else lambda j: distributed.total(j, world, device))


def run(model: GPT, opt, batches, accum: int, evaluate: Callable[[], float], schedule: Callable[[int], float],
        config: RunConfig, tokenizer, found: checkpoint.Found | None, world: World, log: Callable[..., None],
        make_sample: Callable[[], str] | None = None) -> dict:
    """Train from the checkpoint (or the start) to the horizon or a stop; see train() in pretrain.py
    for what it returns."""
    settings, main = config.train, world.main
    run_dir = settings.run_dir
    if not main:
        log = _quiet
    step = TrainStep(model, opt, settings.device, compile_model=config.recipe.compile, grad_clip=settings.grad_clip,
                     world=world)  # its compile-failure report is set below, once the log file is open
    recipe, device = config.recipe, settings.device
    loop = Loop(model, opt, step, batches, accum, evaluate, schedule, config, meters=None, world=world, log=log,
                out_of_memory=lambda saved: out_of_memory_message(config.model_config, recipe, device, saved,
                                                                  world.size))
    if found:
        _restore(loop, found, config, log)
    else:
        if main:
            tokenizer.save(run_dir / "tokenizer")
            (run_dir / "log.jsonl").write_text("")
        loop.first_bpb = loop.last_bpb = evaluate()
        log(f"step 0: validation {loop.first_bpb:.4f} bits per byte")
    if main:
        write_json(run_dir / "config.json", config.to_dict())
    loop.meters = _meters(settings, model, found, world, log)

    def compile_failed(message: str) -> None:
        log(f"warning: torch.compile failed ({message}); training goes on uncompiled (slower, the same math)")
        loop.event("compile_failed", message=message)
    step.on_compile_failed = compile_failed

    _run_files(loop, found, main, run_dir)
    sample = None
    if loop.step >= settings.steps:  # trained to the horizon, even if the last checkpoint failed
        sample = _finish(loop, model, config, tokenizer, make_sample) if main else None
        if loop.status == "running":
            loop.status = "finished"
    stopped = None if loop.status == "finished" else "failed" if loop.status == "failed" else loop.stop_reason
    return {"model": model, "val_bpb_start": loop.first_bpb, "val_bpb_end": loop.last_bpb, "sample": sample,
            "history": loop.history, "run_dir": run_dir, "step": loop.step, "stopped": stopped,
            "message": loop.message, "last_checkpoint": loop.last_saved, "summary": _last_summary(loop, log)}


def _last_summary(loop: Loop, log: Callable[..., None]) -> dict:
    """The session's summary, written where the disk allows: the disk that kept the final weights from
    being written is often full for the summary too, and the closing words (what was kept, the line
    that resumes) matter more than a bare OSError."""
    try:
        return loop.write_summary()
    except OSError as error:
        log(f"warning: {loop.run_dir / 'summary.json'} could not be written ({one_line(error)})")
        return loop.summary()


def _finish(loop: Loop, model: GPT, config: RunConfig, tokenizer, make_sample: Callable[[], str] | None) -> str | None:
    """The sample and the final weights; the summary says "finished" only once they are written."""
    settings = config.train
    try:
        sample = make_sample() if make_sample else sample_text(model, tokenizer, settings.sample_prompt,
                                                               settings.sample_tokens, seed=settings.seed)
        config.results = {"val_bpb_start": loop.first_bpb, "val_bpb_end": loop.last_bpb, "steps": loop.step,
                          "tokens": loop.meters.tokens, "sample": sample}
        save_final(settings.run_dir, model, config)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        loop.status, loop.message = "failed", f"the final weights could not be written: {one_line(error)}"
        return None
    except KeyboardInterrupt:
        loop.status, loop.message = "interrupted", "interrupted while writing the final weights: the same " \
            "command writes them"
        loop.write_summary()
        raise
    return sample


def _run_files(loop: Loop, found, main: bool, run_dir: Path) -> None:
    """The loop inside its stop handler, log file, progress display and power meter."""
    stop = StopRequest()
    loop.meters.power.start()
    try:
        with stop, (run_dir / "log.jsonl" if main else Path(os.devnull)).open("a") as log_file, \
                Progress(loop.settings.steps, currency=loop.settings.currency, start_step=loop.step,
                         stream=None if main else log_file) as progress:
            if found:
                loop.log_file = log_file
                loop.event("resume", path=str(found.path.relative_to(run_dir)))
                set_rng_state(*checkpoint.read_rng(found))
            loop.run(stop, progress, log_file, resumed=found is not None)
            loop.stop_reason = stop.reason
    except KeyboardInterrupt:
        loop.status = "interrupted"
        raise
    except BrokenPipeError as error:  # the reader of the output left (`| head`): cli.main exits 141, no advice
        loop.status, loop.message = "failed", str(error)
        raise
    except OSError as error:  # a full disk, most often, under the log or the summary
        loop.status, loop.message = "failed", f"{one_line(error)}: stopped at step {loop.step}; {loop.kept()}. " \
            "Free space (or fix what the error names) and run the same command to resume"
        raise UsageError(loop.message) from None
    except Exception as error:
        loop.status, loop.message = "failed", str(error)
        raise
    finally:
        loop.meters.power.stop()
        try:
            loop.write_summary()
        except OSError:  # the same full disk: the error on its way out says what happened
            pass


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""

