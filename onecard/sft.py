"""`onecard sft`: supervised fine-tuning of a base model on conversations, as nanochat's chat SFT.

The model learns the assistant's turns only (the mask of onecard/conversations.py). Defaults
follow nanochat's SFT (karpathy/nanochat, scripts/chat_sft.py at commit fae3aca): learning rates
0.02 of base training's, decaying linearly to zero; one epoch; 32 conversations per step, each
micro-batch padded to its longest conversation (or packed with --pack). The run is an onecard
run like any other: the planner's recipe, lock, checkpoints, exact resume, signals, meters and
report, and `onecard chat` talks to the result. A nanochat-2026 model fine-tunes as its own
chat_sft.py does (karpathy/nanochat 00255c1): its rates times --lr-fraction, no weight decay, the
rate constant for the first half and then down to zero, Muon's momentum from 0.85 to 0.95.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
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
from onecard.units import quantity

LR_FRACTION = 0.02  # of base training's learning rates (nanochat's chat_sft init_lr_frac)
# The embedded set teaches the tiny CPU demo model a format in a few minutes: measured on it,
# nanochat's 0.02 and one epoch leave the assistant's text at 2.79 bits per byte and the replies
# formless; base training's own rates and three epochs reach 1.17 in 80 s and answer in the format.
EMBEDDED_LR_FRACTION, EMBEDDED_EPOCHS = 1.0, 3.0
EXAMPLES_PER_STEP = 32  # nanochat's chat_sft target_examples_per_step
MICRO_BATCH = 4  # nanochat's chat_sft device_batch_size
SAMPLE_QUESTION = "What does `json.dumps` do?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", type=text_arg,
                   help="the base model: an onecard run directory or a nanochat checkpoint directory (default: "
                        "the newest finished `onecard train` run under ./runs; resuming: the base the run started "
                        "from, or, if that is gone, the run's own checkpoint)")
    p.add_argument("--data", action="append", type=text_arg, metavar="PATH[:WEIGHT]",
                   help="conversations: .jsonl ({\"messages\": [...]} or a list of messages per line), .json "
                        "(a list of them) or .parquet (a messages column), or ARC, MMLU and GSM8K rows, made "
                        "conversations; or a folder: its train* files at any depth (e.g. data/arc from `onecard "
                        "data download arc`), else its files but test*, val* and dev*; repeat to mix, :2 for two "
                        "epochs of a source per epoch, :0.5 for half of it (default: the embedded set, questions "
                        "about the standard library and arithmetic with the tool)")
    p.add_argument("--skip-bad", action="store_true", help="count lines that are not JSON and go on")
    p.add_argument("--run-dir", type=text_arg, help="where the run is written (default runs/<date-time>-sft)")
    p.add_argument("--epochs", type=positive_float,
                   help=f"passes over the conversations (default 1; the embedded set {EMBEDDED_EPOCHS:g})")
    p.add_argument("--steps", type=positive_int, help="optimizer steps instead of --epochs")
    p.add_argument("--batch", type=positive_int, default=EXAMPLES_PER_STEP,
                   help=f"conversations per optimizer step, or with --pack rows of --seq-len tokens (default "
                        f"{EXAMPLES_PER_STEP})")
    p.add_argument("--micro-batch", type=positive_int,
                   help=f"conversations per forward/backward (default: the largest that fits; on the CPU the "
                        f"largest divisor of --batch per rank up to {MICRO_BATCH})")
    p.add_argument("--seq-len", type=positive_int, help="longest conversation in tokens (default: the model's context)")
    p.add_argument("--pack", action="store_true", help="pack conversations back to back into full rows")
    p.add_argument("--lr-fraction", type=positive_float,
                   help=f"learning rates as a fraction of base training's (default {LR_FRACTION}, nanochat's; the "
                        f"embedded set {EMBEDDED_LR_FRACTION:g})")
    p.add_argument("--seed", type=seed, default=0, help="default 0")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="cpu, cuda or auto (default)")
    p.add_argument("--eval-every", type=non_negative_int, default=50,
                   help="validation bits per byte of the assistant's text every N steps (default 50; 0: at the end)")
    p.add_argument("--eval-batches", type=positive_int, default=defaults.EVAL_BATCHES,
                   help=f"validation micro-batches per evaluation, of the run's first micro-batch: a resume "
                        f"with another one scores the same rows (default {defaults.EVAL_BATCHES})")
    add_recipe_arguments(p)
    add_run_arguments(p)


def newest_base_run() -> Path:
    """The newest finished `onecard train` run under ./runs: what `onecard sft` starts from by default."""
    from onecard.run import newest_run

    found = newest_run("pretrain")
    if found is None:
        raise UsageError("no finished `onecard train` run under runs/: train one first (`onecard train`), or "
                         "give --from RUN_DIR")
    return found


def run(args: argparse.Namespace) -> int:
    from onecard import distributed
    from onecard.device import resolve_device, use_threads
    from onecard.run import RunLock

    device = resolve_device(args.device)
    use_threads(args.threads, device)
    if args.steps and args.epochs:
        raise UsageError("give --steps or --epochs, not both")
    embedded = not args.data
    args.epochs = args.epochs or (EMBEDDED_EPOCHS if embedded else 1.0)
    args.lr_fraction = args.lr_fraction or (EMBEDDED_LR_FRACTION if embedded else LR_FRACTION)
    world = distributed.init(device)
    try:
        run_dir = Path(distributed.from_rank0(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-sft", world))
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} is a file, not a directory")
        with nullcontext() if args.dry_run else distributed.held_by_rank0(lambda: RunLock(run_dir), world):
            code = _sft(args, run_dir, device, world)
        distributed.barrier(world)
        return code
    finally:
        distributed.finish(world)


def _data(args: argparse.Namespace, tokenizer, seq_len: int, say):
    from onecard import sft_data
    from onecard.data import Corpus
    from onecard.embedded_chat import conversations

    if args.data:
        sources = [sft_data.Source.parse(text) for text in args.data]
        return sft_data.load(sources, tokenizer, seq_len + 1, skip_bad=args.skip_bad, say=say)
    corpus = Corpus.embedded()
    label = f"embedded chat set ({corpus.label.removeprefix('embedded: ')})"
    return sft_data.load([], tokenizer, seq_len + 1, raw=conversations(corpus), label=label)


def _base_model(args: argparse.Namespace, run_dir: Path, saved, device: str):
    """(the base model's directory, model, tokenizer, info). A run being resumed starts from the base
    it started from (not the newest base run, which may have come since), and needs only its own
    directory: its checkpoint holds the weights, its tokenizer/ the tokenizer, if the base is gone."""
    from onecard.family import build_model
    from onecard.tokenizer import Tokenizer
    from onecard.weights import load_weights

    source = Path(args.source) if args.source else Path(saved.init_from) if saved and saved.init_from \
        else newest_base_run()
    if run_dir.resolve() == source.resolve():
        raise UsageError("--run-dir must differ from --from: SFT writes a new run beside the base model")
    if saved and (run_dir / "tokenizer").is_dir():  # its own tokenizer even where the base is (retrained since?)
        model = build_model(saved.model_config, device, init=False)  # the checkpoint's weights come next
        gone = {} if source.exists() else {
            "note": f"{source} is gone: the run resumes from its own checkpoint and tokenizer"}
        return source, model, Tokenizer.load(run_dir / "tokenizer"), {"layout": "onecard", **gone}
    return (source, *load_weights(source, device))


def _sft(args: argparse.Namespace, run_dir: Path, device: str, world) -> int:
    from onecard import distributed, family, session, sft_data
    from onecard.device import host_memory_available, local_card, unrunnable_reason
    from onecard.plan.choose import choose_recipe
    from onecard.plan.report import dry_run_text
    from onecard.recipe import default_micro_batch

    say = print if world.main else (lambda *_args, **_kwargs: None)
    # rank 0's reading: the others could read it after rank 0 set a damaged checkpoint aside
    saved = None if args.force_new else distributed.decided_by_rank0(
        lambda: session.saved_run_config(run_dir), world)
    source, model, tokenizer, info = _base_model(args, run_dir, saved, device)
    if "note" in info:
        say(f"note: {info['note']}")
    config = model.config
    seq_len = args.seq_len or config.sequence_len
    if seq_len > config.sequence_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context {config.sequence_len}")
    train_set, val_set = _data(args, tokenizer, seq_len, say)
    # an epoch is its conversations, or packed, the rows they fill
    units = sft_data.packed_rows(train_set, seq_len + 1) if args.pack else len(train_set)
    steps = args.steps or max(1, round(units * args.epochs / args.batch))
    cpu_default = device == "cpu" and not (args.gpu or args.vram)  # else the planner picks the largest that fits
    micro = args.micro_batch or (default_micro_batch(args.batch / world.size, MICRO_BATCH) if cpu_default else None)
    choice = choose_recipe(recipe_request(args, device), config, device, seq_len=seq_len, micro_batch=micro,
                           total_batch=args.batch * seq_len, tokens=steps * args.batch * seq_len, gpus=world.size,
                           local=local_card(), host_bytes=host_memory_available() if device == "cuda" else None,
                           why_not=lambda recipe: unrunnable_reason(recipe, device))
    recipe = choice.recipe
    if args.batch % (recipe.micro_batch * world.size):
        raise UsageError(f"--batch {args.batch} is not a multiple of micro-batch × ranks = "
                         f"{recipe.micro_batch} × {world.size}")
    say(f"SFT of {info['layout']} weights in {source} ({defaults.model_name(config)}, context "
        f"{config.sequence_len}) on {device}, recipe {recipe.name}")
    say(f"data: {sft_data.report(train_set, val_set)}")
    what = f"rows of {seq_len:,} tokens ({units:,} an epoch)" if args.pack else "conversations"
    say(f"{quantity(steps, 'step')} × {args.batch} {what} (micro-batch {recipe.micro_batch}); run directory {run_dir}")
    if args.dry_run:
        say(dry_run_text(recipe, choice.candidate, choice.settings, choice.notes, config)
            + "\nnote: memory and time are planned for full-length rows; padded rows are shorter")
        return 0
    for note in choice.notes:
        say(f"note: {note}")
    clip = saved.train.grad_clip if saved else family.grad_clip(config)  # a run being resumed keeps its own
    settings = _settings(args, run_dir, steps, device, clip)
    result = fine_tune(model, tokenizer, train_set, val_set, recipe, settings, world, pack=args.pack,
                       init_from=str(source.expanduser().resolve()), prediction=choice.prediction(device))
    return _closing_words(result, run_dir, steps, say)


def _settings(args: argparse.Namespace, run_dir: Path, steps: int, device: str, grad_clip: float):
    from onecard.run import TrainSettings

    base = TrainSettings(run_dir=run_dir, steps=steps, total_batch=args.batch)
    return TrainSettings(
        run_dir=run_dir, steps=steps, total_batch=args.batch, seed=args.seed, device=device,
        eval_every=args.eval_every, eval_batches=args.eval_batches,
        matrix_lr=base.matrix_lr * args.lr_fraction, embedding_lr=base.embedding_lr * args.lr_fraction,
        unembedding_lr=base.unembedding_lr * args.lr_fraction, lr_fraction=args.lr_fraction, grad_clip=grad_clip,
        sample_prompt=SAMPLE_QUESTION,
        save_every_min=args.save_every_min if args.save_every_min is not None else defaults.SAVE_EVERY_MIN,
        save_every_steps=args.save_every_steps or 0, keep=args.keep or defaults.KEEP, force_new=args.force_new,
        price=args.price, currency=args.currency or defaults.CURRENCY, power_watts=args.power)


def fine_tune(model, tokenizer, train_set, val_set, recipe, settings, world=None, log=print, init_from=None,
              prediction=None, pack: bool = False) -> dict:
    """Fine-tune `model` on conversations, or resume the run directory's SFT; returns what
    pretrain.train returns."""
    from onecard import session
    from onecard.distributed import SINGLE
    from onecard.engine import evaluate_bpb, first_rows
    from onecard.family import apply_sft_schedule
    from onecard.sft_data import ConversationBatches

    world = world or SINGLE
    accum = settings.total_batch // (recipe.micro_batch * world.size)
    found, model, config, opt = session.prepare(model.config, recipe, settings, train_set.label, prediction, model,
                                                world, log, stage="sft", init_from=init_from)
    pad = tokenizer.bos_id
    batches = ConversationBatches(train_set, recipe.micro_batch, recipe.seq_len, pad, seed=settings.seed, pack=pack)
    token_bytes = tokenizer.token_bytes()

    def validation_bpb() -> float:
        val = ConversationBatches(val_set, recipe.micro_batch, recipe.seq_len, pad, shuffle=False, pack=pack)
        return evaluate_bpb(model, first_rows(val, settings.eval_rows), token_bytes, settings.device)

    def schedule(step: int) -> float:
        return apply_sft_schedule(model.config, opt, step, settings.steps)

    def sample() -> str:
        from onecard.conversations import normalize, prompt_ids, show_tool_calls
        from onecard.engine import Engine, Sampling

        question = [{"role": "user", "content": settings.sample_prompt}]
        prompt = prompt_ids(tokenizer, normalize(question, training=False))
        reply = Engine(model, tokenizer).complete(prompt, Sampling(temperature=0, max_tokens=64))[0]
        return f"user: {settings.sample_prompt}\nassistant: {show_tool_calls(tokenizer.decode(reply))}"

    return session.run(model, opt, batches, accum, validation_bpb, schedule, config, tokenizer, found, world, log,
                       make_sample=sample)


def _closing_words(result: dict, run_dir: Path, steps: int, say) -> int:
    import sys

    from onecard.run import last_checkpoint_words

    if result["stopped"] in ("nonfinite", "failed"):
        say(f"onecard: {result['message']}; {last_checkpoint_words(result, run_dir)}", file=sys.stderr)
        return 1
    if result["stopped"]:
        say(f"stopped at step {result['step']} of {steps}; resume with the same command and --run-dir {run_dir}")
        return 0
    say(f"validation bits per byte of the assistant's text: {result['val_bpb_start']:.4f} at step 0 -> "
        f"{result['val_bpb_end']:.4f} at step {steps}")
    say(result["sample"])
    say(f"\nchat model saved in {run_dir}/ — talk to it: onecard chat {run_dir}")
    return 0
