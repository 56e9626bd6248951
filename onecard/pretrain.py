"""`onecard train`: base training, nanochat's recipe on whatever Recipe the run is given.

One optimizer step = `accum` micro-batches of (micro_batch × seq_len) tokens, so that each
step sees `total_batch` tokens. Learning rate constant then linear decay over the last 20 %;
Muon momentum warms from 0.85 to 0.95; gradients clipped at 1.0. Validation bits per byte
every `eval_every` steps. The loop itself, its log and its faults are onecard/loop.py's.

A run directory that holds a checkpoint resumes from it, bitwise exactly on the CPU (weights,
optimizer states, data position and every RNG state are restored); a different model,
sequence length, batch, seed or corpus is refused unless `force_new` (another recipe is
allowed: weights and optimizer states convert).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from onecard import defaults
from onecard.args import (
    add_recipe_arguments,
    add_run_arguments,
    non_negative_int,
    positive_float,
    positive_int,
    recipe_request,
    seed,
    text_arg,
)
from onecard.errors import UsageError
from onecard.model_config import ARCH_2026, ARCHS, VOCAB_2026
from onecard.schedule_2026 import RATIO as RATIO_2026
from onecard.units import quantity


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=text_arg, help="dN, e.g. d20 or d32 (default: a small demo model for the CPU)")
    p.add_argument("--depth", type=positive_int, help="depth N instead of --model dN")
    p.add_argument("--arch", choices=ARCHS, help="model family: classic (nanochat Oct 2025, the default) or "
                                                 "nanochat-2026 (nanochat 92d63d4: value embeddings, sliding "
                                                 "windows, its optimizer and schedules)")
    p.add_argument("--data", type=text_arg, help="corpus: .txt/.jsonl/.parquet file or directory (default: "
                                                 "embedded corpus, the Python standard library's own source)")
    p.add_argument("--run-dir", type=text_arg, help="where the run is written (default runs/<date-time>); a "
                                                    "directory that holds a checkpoint is resumed")
    p.add_argument("--init-from", type=text_arg, help="start from the weights and tokenizer of an onecard run "
                                                      "directory or a nanochat checkpoint directory (an onecard "
                                                      "run's batch and context are kept unless given)")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per row (default {defaults.SEQ_LEN}; "
                                                        f"demo {defaults.DEMO['seq_len']})")
    p.add_argument("--micro-batch", type=positive_int,
                   help="rows per forward/backward (default: the largest that fits the card; 8 on the CPU)")
    p.add_argument("--total-batch", type=positive_int, help="tokens per optimizer step, reached by gradient "
                                                            f"accumulation (default {defaults.TOTAL_BATCH}; "
                                                            "nanochat-2026: its own, growing with depth; demo "
                                                            f"{defaults.DEMO['total_batch']})")
    horizon = p.add_mutually_exclusive_group()
    horizon.add_argument("--steps", type=positive_int, help="optimizer steps")
    horizon.add_argument("--tokens", type=positive_int, help="training tokens (e.g. 38e9 or 38B)")
    horizon.add_argument("--ratio", type=positive_float,
                         help=f"training tokens per parameter (default {defaults.RATIO}; nanochat-2026: "
                              f"{RATIO_2026} per matrix and lm_head parameter, as nanochat)")
    p.add_argument("--vocab-size", type=positive_int,
                   help=f"tokenizer size when training one (default {defaults.VOCAB_SIZE}; nanochat-2026: "
                        f"{VOCAB_2026}; demo {defaults.DEMO['vocab_size']}; with --tokenizer, that "
                        "tokenizer's size, which a --vocab-size given must equal)")
    p.add_argument("--tokenizer", type=text_arg, metavar="DIR",
                   help="use this tokenizer instead of training one: a folder `onecard tokenizer train --out DIR` "
                        "wrote, or a run's RUN_DIR/tokenizer; the model's vocabulary is its size, and it is saved "
                        "into the run directory (not with --init-from, which brings its own; a resumed run keeps "
                        "its own and refuses another)")
    p.add_argument("--tokenizer-chars", type=positive_int, help="characters to train the tokenizer on")
    p.add_argument("--seed", type=seed, help="default 0")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu, cuda or auto (default)")
    p.add_argument("--eval-every", type=non_negative_int,
                   help=f"validation bits per byte every N steps (0: only at the end; default {defaults.EVAL_EVERY})")
    p.add_argument("--eval-batches", type=positive_int,
                   help=f"validation micro-batches per evaluation, of the run's first micro-batch: a resume "
                        f"with another one scores the same rows (default {defaults.EVAL_BATCHES})")
    p.add_argument("--sample-prompt", help="prompt for the sample printed at the end")
    add_recipe_arguments(p)
    add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    from onecard import distributed
    from onecard.device import resolve_device, use_threads

    device = resolve_device(args.device)
    use_threads(args.threads, device)
    world = distributed.init(device)  # several ranks when started by torchrun
    try:
        code = _locked(args, device, world)
        distributed.barrier(world)  # rank 0 writes last: no rank leaves the group before it is done
        return code
    finally:
        distributed.finish(world)


def _locked(args: argparse.Namespace, device: str, world) -> int:
    """Rank 0 holds the run directory's lock for the whole run; the other ranks write nothing there."""
    from contextlib import nullcontext

    from onecard import distributed
    from onecard.run import RunLock

    run_dir = Path(distributed.from_rank0(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}", world))
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory")
    with nullcontext() if args.dry_run else distributed.held_by_rank0(lambda: RunLock(run_dir), world):
        return train_command(args, run_dir, device, world)


def _shape(args: argparse.Namespace, saved, device: str, say, given_vocab: int | None = None):
    """(model config, model or None, tokenizer or None, seq_len, micro_batch, what was continued);
    given_vocab: the size of the --tokenizer given, for a new model."""
    from onecard.model_config import GPTConfig, depth_from
    from onecard.weights import load_weights

    depth = depth_from(args.model, args.depth)
    demo = depth is None and not args.init_from and (not saved or defaults.is_demo_shape(saved.model_config))
    arch = getattr(args, "arch", None)
    if saved:
        seq_len = args.seq_len or saved.recipe.seq_len
        vocab = args.vocab_size or saved.model_config.vocab_size
        context = args.seq_len or saved.model_config.sequence_len
        arch = arch or saved.model_config.arch
        config = GPTConfig.from_depth(depth, vocab, seq_len, arch=arch) if depth else \
            GPTConfig(**{**saved.model_config.to_dict(), "vocab_size": vocab, "sequence_len": context, "arch": arch})
        return config, None, None, seq_len, args.micro_batch or saved.recipe.micro_batch, saved.train, demo
    if args.init_from:
        model, tokenizer, info = load_weights(args.init_from, device)
        if arch and arch != model.config.arch:
            raise UsageError(f"--init-from {args.init_from} holds a {model.config.arch} model, not --arch {arch}")
        _check_init_shape(args, depth, model.config)
        say(f"starting from {info['layout']} weights in {info['path']}")
        # a pre-training run's batch, data and horizon carry over; an SFT run's count conversations
        before = info["config"].train if info["layout"] == "onecard" and info["config"].stage == "pretrain" else None
        seq_len = args.seq_len or (info["config"].recipe.seq_len if before else model.config.sequence_len)
        micro = args.micro_batch or (info["config"].recipe.micro_batch if before and device == "cpu" else None)
        return model.config, model, tokenizer, seq_len, micro, before, demo
    arch = arch or "classic"
    seq_len = args.seq_len or (defaults.DEMO["seq_len"] if demo else defaults.SEQ_LEN)
    full_vocab = VOCAB_2026 if arch == ARCH_2026 else defaults.VOCAB_SIZE
    if args.vocab_size:  # refused before the run is described and a tokenizer is started
        from onecard.tokenizer import check_vocab_size
        check_vocab_size(args.vocab_size)
    vocab = args.vocab_size or given_vocab or (defaults.DEMO["vocab_size"] if demo else full_vocab)
    config = GPTConfig.from_depth(depth, vocab, seq_len, arch=arch) if depth else GPTConfig(
        sequence_len=seq_len, vocab_size=vocab, n_layer=defaults.DEMO["n_layer"], n_head=defaults.DEMO["n_head"],
        n_kv_head=defaults.DEMO["n_head"], n_embd=defaults.DEMO["n_embd"], arch=arch)
    return config, None, None, seq_len, args.micro_batch, None, demo


def _check_init_shape(args: argparse.Namespace, depth: int | None, config) -> None:
    """The weights of --init-from set the model: a depth or vocabulary that differs is refused, not ignored."""
    if depth is not None and depth != config.n_layer:
        raise UsageError(f"--init-from {args.init_from} holds a model of depth {config.n_layer}, not {depth}: "
                         "its weights set the model; drop --model/--depth")
    if args.vocab_size and args.vocab_size != config.vocab_size:
        raise UsageError(f"--init-from {args.init_from} holds a model of {config.vocab_size:,} tokens, not "
                         f"--vocab-size {args.vocab_size:,}: it brings its own tokenizer; drop --vocab-size")


def _steps(args: argparse.Namespace, params: int, total_batch: int, before, demo: bool,
           ratio: float = defaults.RATIO) -> int:
    if args.steps:
        return args.steps
    from onecard.plan.search import whole_steps

    if args.tokens or args.ratio:
        return whole_steps(args.tokens or args.ratio * params, total_batch) // total_batch
    if before is not None and before.steps:
        return before.steps
    return defaults.DEMO["steps"] if demo else whole_steps(ratio * params, total_batch) // total_batch


def train_command(args: argparse.Namespace, run_dir: Path, device: str, world) -> int:
    """`onecard train` on this rank (rank 0 alone prints)."""
    from onecard import distributed, family, session
    from onecard.data import Corpus
    from onecard.datasources import plan_shards, shard_set_for
    from onecard.device import host_memory_available, local_card, unrunnable_reason
    from onecard.model_config import param_counts
    from onecard.plan.choose import choose_recipe
    from onecard.plan.report import dry_run_text
    from onecard.plan.search import horizon
    from onecard.run import resume_command
    from onecard.tokenizer import Tokenizer

    say = print if world.main else (lambda *_args, **_kwargs: None)
    # rank 0's reading: the others could read it after rank 0 set a damaged checkpoint aside
    saved = None if args.force_new else distributed.decided_by_rank0(
        lambda: session.saved_run_config(run_dir), world)
    if saved and args.init_from:
        raise UsageError(f"{run_dir} holds a run to resume; --init-from starts a new one: drop it, or add "
                         "--force-new")
    named_tokenizer = given_tokenizer(args, saved, run_dir, world)
    config, model, tokenizer, seq_len, micro_batch, before, demo = _shape(
        args, saved, device, say, named_tokenizer.vocab_size if named_tokenizer else None)

    def pick(given, key: str, default):
        """What was given, else what the run continued from used, else the default."""
        return given if given is not None else getattr(before, key, default) if before else default

    # recorded absolute: a resume or an eval from another folder finds it again
    data = pick(str(Path(args.data).expanduser().resolve()) if args.data else None, "data", None)
    corpus = Corpus(data) if data else Corpus.embedded()
    params = sum(param_counts(config).values())
    full_batch, ratio_params, ratio = horizon(config)  # the family's batch, counted parameters and ratio
    total_batch = pick(args.total_batch, "total_batch", defaults.DEMO["total_batch"] if demo else full_batch)
    steps = _steps(args, ratio_params, total_batch, before, demo, ratio)
    choice = choose_recipe(recipe_request(args, device), config, device, seq_len=seq_len, micro_batch=micro_batch,
                           total_batch=total_batch, tokens=steps * total_batch,
                           resumed=saved.recipe if saved else None, gpus=world.size, local=local_card(),
                           host_bytes=host_memory_available() if device == "cuda" else None,
                           why_not=lambda recipe: unrunnable_reason(recipe, device))
    recipe = choice.recipe
    grad_accum_steps(total_batch, recipe.micro_batch, recipe.seq_len, world.size, saved is not None)  # dry runs too
    what = defaults.model_name(config) + (f" ({config.arch})" if config.arch != "classic" else "")
    say(f"{what}: {params:,} parameters (n_layer {config.n_layer}, n_embd {config.n_embd}, "
        f"vocab {config.vocab_size:,}, context {config.sequence_len}) on {device}"
        + (f" x {world.size} ranks" if world.size > 1 else "") + f", recipe {recipe.name}")
    say(f"{quantity(steps, 'step')} × {total_batch:,} tokens = {steps * total_batch:,} tokens; run directory {run_dir}")
    unfed = _unfed_note(args, data, corpus, config.arch)
    if args.dry_run:
        say(dry_run_text(recipe, choice.candidate, choice.settings, choice.notes, config))
        if not demo:  # the text such a run reads, in its set's shards and disk (onecard/datasources.py)
            shards = plan_shards(steps * total_batch, shard_set_for(config.arch, data))
            say(f"data: {shards.line()}" + shards.coverage(corpus))
        if unfed:
            say(f"note: {unfed}")
        return 0
    for note in choice.notes + ([unfed] if unfed else []):
        say(f"note: {note}")
    if not (saved or args.force_new):  # before a tokenizer is trained: that can take minutes
        session.refuse_finished_without_checkpoint(run_dir)
    if saved:
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
        say(f"{run_dir} holds a run: resuming it")
    elif named_tokenizer is not None:
        tokenizer = named_tokenizer  # session.run saves it into the run directory with the first files
        say(f"tokenizer: {tokenizer.vocab_size:,} tokens from {args.tokenizer}")
    elif tokenizer is None:
        tokenizer = shared_tokenizer(args, corpus, config.vocab_size, demo, run_dir, world, say)
    settings = _settings(args, pick, demo, run_dir=run_dir, steps=steps, total_batch=total_batch, device=device,
                         data=data, grad_clip=pick(None, "grad_clip", family.grad_clip(config)))  # a run keeps its own
    prediction = choice.prediction(device)
    if prediction:
        say(f"planner predicts on {prediction.gpu}: peak {prediction.peak_bytes / 2**30:.2f} GiB "
            f"({prediction.peak_allocated_bytes / 2**30:.2f} GiB allocated), "
            f"{prediction.step_time_s:.2f} s per step, {prediction.tokens_per_s:,.0f} tokens/s")
    result = train(config, tokenizer, corpus, recipe, settings, model=model, prediction=prediction, world=world)
    resume = resume_command("train", run_dir, world.size, args.threads, args.device if args.device != "auto" else None)
    return _closing_words(result, resume, steps, total_batch, prediction, say)


def _unfed_note(args: argparse.Namespace, data: str | None, corpus, arch: str) -> str | None:
    """A model asked for by size with no --data trains on the embedded corpus, a few MB read over
    and over: said, since the plan's data line counts the shards such a model ought to read."""
    from onecard.datasources import shard_set_for

    if data or not (args.model or args.depth):
        return None
    shard_set = shard_set_for(arch).name
    return (f"no --data: this run trains on the embedded corpus ({sum(corpus.sizes) / 1e6:.1f} MB of Python "
            f"source, read over and over), not on {shard_set} shards; give --data data/{shard_set} "
            f"(`onecard data download {shard_set}` fills it)")


def _settings(args: argparse.Namespace, pick, demo: bool, **chosen):
    """The run's TrainSettings: what was chosen above, and each flag picked (given, or what the run
    continued from used, or the default)."""
    from onecard.run import TrainSettings

    return TrainSettings(
        **chosen, seed=pick(args.seed, "seed", 0),
        eval_every=pick(args.eval_every, "eval_every", defaults.DEMO["eval_every"] if demo else defaults.EVAL_EVERY),
        eval_batches=pick(args.eval_batches, "eval_batches", defaults.EVAL_BATCHES),
        sample_prompt=pick(args.sample_prompt, "sample_prompt", ""),
        save_every_min=pick(args.save_every_min, "save_every_min", defaults.SAVE_EVERY_MIN),
        save_every_steps=pick(args.save_every_steps, "save_every_steps", 0),
        keep=pick(args.keep, "keep", defaults.KEEP),
        force_new=args.force_new, price=pick(args.price, "price", None),
        currency=pick(args.currency, "currency", defaults.CURRENCY), power_watts=pick(args.power, "power_watts", None))


def _closing_words(result: dict, resume: str, steps: int, total_batch: int, prediction, say) -> int:
    from onecard.run import compare_text, last_checkpoint_words

    run_dir = result["run_dir"]
    if result["stopped"] in ("nonfinite", "failed"):
        say(f"onecard: {result['message']}; {last_checkpoint_words(result, run_dir)} "
            f"({_going_on(result, resume)})", file=sys.stderr)
        return 1
    if result["stopped"]:
        where = ("no checkpoint could be written" if result["last_checkpoint"] is None
                 else f"checkpoint of step {result['last_checkpoint']} saved")
        say(f"stopped at step {result['step']} of {steps}, {where}; {_going_on(result, resume)}")
        return 0
    if prediction:
        say(compare_text(prediction.to_dict(), result["summary"], result["history"], total_batch))
    say(f"validation bits per byte: {result['val_bpb_start']:.4f} at step 0 -> {result['val_bpb_end']:.4f} "
        f"at step {steps}")
    say("sample:")
    say(result["sample"])
    say(f"\nrun saved in {run_dir}/ — continue a prompt with: onecard sample --run-dir {run_dir} --prompt '...'; "
        f"charts: onecard report {run_dir}")
    return 0


def _going_on(result: dict, resume: str) -> str:
    """What to run next. Without a checkpoint there is nothing to resume: `--run-dir` alone would
    start the default run (the demo) there, not this one, so the command that started it is the way on."""
    from onecard.session import final_written

    if result["last_checkpoint"] is not None:
        return f"resume with: {resume}"
    if final_written(result["run_dir"]):  # the weights are whole; only a checkpoint to train further from is missing
        return f"the final weights are written in {result['run_dir']}/"
    return "nothing to resume: the command that started the run starts it over"


def given_tokenizer(args: argparse.Namespace, saved, run_dir: Path, world):
    """--tokenizer DIR, checked; None without it, and on a resume (which keeps the run's own). Rank 0
    reads it and hands it to the other ranks: every rank encodes with the one rank 0 checked, and a
    refusal stops every rank (rank 0 with its reason) instead of leaving them in a collective."""
    from onecard import distributed
    from onecard.tokenizer import Tokenizer

    named = getattr(args, "tokenizer", None)
    if not named:
        return None
    if args.init_from:
        raise UsageError(f"--init-from {args.init_from} brings the tokenizer its weights were trained with: drop "
                         "--tokenizer")
    if args.tokenizer_chars:
        raise UsageError("--tokenizer-chars is for training a tokenizer, and --tokenizer gives one: drop one of them")
    def load() -> Tokenizer:
        try:
            return Tokenizer.load(Path(named).expanduser())
        except UsageError as error:
            raise UsageError(f"--tokenizer: {error}") from None
    loaded = distributed.decided_by_rank0(load, world)
    if saved:
        if not loaded.same_as(Tokenizer.load(run_dir / "tokenizer")):
            raise UsageError(f"--tokenizer {named} is not the tokenizer of the run in {run_dir}, which resumes with "
                             "its own: drop --tokenizer, or add --force-new to start a new run with it")
        return None
    if args.vocab_size and args.vocab_size != loaded.vocab_size:
        raise UsageError(f"--tokenizer {named} has {loaded.vocab_size:,} tokens, not --vocab-size "
                         f"{args.vocab_size:,}: the model's vocabulary is its tokenizer's; drop --vocab-size")
    return loaded


def shared_tokenizer(args: argparse.Namespace, corpus, vocab_size: int, demo: bool, run_dir: Path, world, say):
    """Train the run's tokenizer; with several ranks, rank 0 trains it and the others read it."""
    from onecard import distributed
    from onecard.data import iter_texts
    from onecard.tokenizer import Tokenizer

    handoff = run_dir / ".tokenizer-for-ranks"
    trained = []

    def train() -> None:
        chars = args.tokenizer_chars or (defaults.DEMO["tokenizer_chars"] if demo else 2_000_000_000)
        say(f"training a {vocab_size:,}-token tokenizer on {corpus.describe()} ...", flush=True)
        started = time.perf_counter()
        trained.append(Tokenizer.train(iter_texts(corpus, chars), vocab_size))
        say(f"  done in {time.perf_counter() - started:.1f} s")
        if world.size > 1:
            trained[0].save(handoff)

    # rank 0's refusal (too few distinct tokens, an unreadable document) stops the other ranks quietly:
    # they would otherwise die at the barrier with a traceback
    distributed.decided_by_rank0(train, world)
    if world.main:
        tokenizer = trained[0]
    else:
        tokenizer = Tokenizer.load(handoff)
    distributed.barrier(world)
    if world.main and world.size > 1:
        shutil.rmtree(handoff, ignore_errors=True)
    return tokenizer


# ---------------------------------------------------------------- the library function

def grad_accum_steps(total_batch: int, micro_batch: int, seq_len: int, ranks: int = 1, resumed: bool = False) -> int:
    """Micro-batches per step on each rank; total_batch must be a whole number of them on every rank.
    A resumed run keeps its total batch: the advice is then a smaller micro-batch, or other ranks."""
    per_micro = micro_batch * seq_len * ranks
    if total_batch <= 0:
        raise UsageError(f"--total-batch must be positive, got {total_batch}")
    if total_batch % per_micro:
        lower = max(per_micro, total_batch // per_micro * per_micro)
        ranks_part = (" × ranks", f" × {ranks}") if ranks > 1 else ("", "")
        rows = total_batch // (seq_len * ranks) if total_batch % (seq_len * ranks) == 0 else 0  # per rank and step
        smaller = max((m for m in range(1, micro_batch) if rows % m == 0), default=None) if rows else None
        if resumed:
            advice = (f"the run keeps its total batch: resume with --micro-batch {smaller}" if smaller else
                      f"the run keeps its total batch, which {ranks} ranks cannot share evenly: resume with "
                      "other ranks")
        else:
            advice = f"use {lower} or {lower + per_micro}" + (f", or --micro-batch {smaller}" if smaller else "")
        raise UsageError(f"--total-batch {total_batch} is not a multiple of micro-batch × seq-len{ranks_part[0]} = "
                         f"{micro_batch} × {seq_len}{ranks_part[1]} = {per_micro}: {advice}")
    return total_batch // per_micro


def train(model_config, tokenizer, corpus, recipe, settings, model=None, log=print, prediction=None,
          world=None) -> dict:
    """Train, or resume from the run directory's checkpoint, and save.

    prediction: the planner's forecast for this run (a plan.choose.Prediction), stored in
    config.json and summary.json so that the report sets it beside the measurement.
    Returns the model, val_bpb_start/val_bpb_end, the sample, this session's history, and
    `stopped` (None when the run finished; "signal", "nonfinite", "limit" or "failed") with a message.
    With several ranks (onecard/distributed.py) every rank trains and rank 0 alone writes and logs.
    """
    from onecard import family, session
    from onecard.distributed import SINGLE
    from onecard.engine import evaluate_bpb, first_rows
    from onecard.loader import TokenLoader
    from onecard.plan.choose import Prediction

    world = world or SINGLE
    if isinstance(prediction, dict):
        prediction = Prediction.from_dict(prediction)
    accum = grad_accum_steps(settings.total_batch, recipe.micro_batch, recipe.seq_len, world.size)
    if recipe.seq_len > model_config.sequence_len:
        raise UsageError(f"seq-len {recipe.seq_len} exceeds the model's context {model_config.sequence_len}")
    found, model, config, opt = session.prepare(model_config, recipe, settings, corpus.describe(), prediction,
                                                model, world, log)
    loader = TokenLoader(corpus, tokenizer, recipe.micro_batch, recipe.seq_len, split="train", seed=settings.seed)
    token_bytes = tokenizer.token_bytes()

    def validation_bpb() -> float:
        val = TokenLoader(corpus, tokenizer, recipe.micro_batch, recipe.seq_len, split="val")
        return evaluate_bpb(model, first_rows(val, settings.eval_rows), token_bytes, settings.device)

    def schedule_step(step: int) -> float:
        return family.apply_schedule(model_config, opt, step, settings.steps)

    return session.run(model, opt, loader, accum, validation_bpb, schedule_step, config, tokenizer, found, world, log)
