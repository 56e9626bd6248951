"""The CORE metric (DCLM, arXiv:2406.11794), scored as nanochat scores it.

The eval bundle (`onecard data download eval-bundle --dir DIR`) holds `core.yaml` (the tasks: label,
kind, data file, shots, continuation delimiter), `eval_data/**.jsonl` (the examples) and
`eval_meta_data.csv` (each task's random-guess accuracy in percent). Three kinds of task:

  multiple_choice    one context, several continuations: the one with the lowest mean loss wins
  schema             several contexts, one continuation: the context under which it has the lowest
                     mean loss wins
  language_modeling  the continuation must be exactly what greedy decoding writes

The rules below are nanochat's, written here anew: prompts, few-shot choice and scoring from
nanochat/core_eval.py (karpathy/nanochat commit fae3aca, in ../shared/reference); reading the
bundle, the shuffle, --max-per-task and the centering from scripts/base_eval.py (not in the
reference copy: read in copies of that script found with the search tool, which agree).
tests/test_core_metric.py proves that rendered tokens, per-example choices and the score equal
nanochat's own core_eval.py on the same model.

  * Examples are shuffled with random.Random(1337) and cut to --max-per-task; example i's k
    few-shot examples are random.Random(1234 + i).sample of the others (after the cut).
  * Prompts: each few-shot example as "<context><delimiter><its gold continuation>\\n\\n", then the
    item; language modelling strips the contexts and the prompt without the continuation.
  * Every prompt is encoded after a <|bos|>; the scored span is what follows the options' common
    prefix (multiple choice), their common suffix (schema), or the continuation.
  * centered accuracy = (accuracy - baseline/100) / (1 - baseline/100); CORE = their mean.

Where nanochat's code stops with an assertion (a language-modelling prompt whose tokens without
the continuation are not a prefix of those with it), onecard scores from the tokens the two share;
rows longer than the model's rotary table are cut from the left (nanochat never cuts its own model's).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onecard.errors import UsageError
from onecard.scoring import BATCH_TOKENS, Row, score_rows
from onecard.tokenizer import Tokenizer

KINDS = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # base_eval.py: the order in which --max-per-task cuts
FEWSHOT_SEED = 1234  # core_eval.py: example i draws its shots from Random(1234 + i)
DEFAULT_BUNDLE = Path("data") / "eval_bundle"  # where `onecard data download eval-bundle` puts it
BUNDLE_HELP = (f"get it with `onecard data download eval-bundle` (about 162 MB, unpacked into {DEFAULT_BUNDLE}, "
               "read from there by default) or give --bundle FOLDER")


@dataclass
class CoreTask:
    label: str
    kind: str
    path: Path  # the task's .jsonl
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent


@dataclass
class TaskScore:
    label: str
    accuracy: float
    centered: float
    examples: int
    predictions: list[int] = field(default_factory=list)  # chosen option (multiple choice, schema); -1 for LM
    correct: list[bool] = field(default_factory=list)


def centered(accuracy: float, random_baseline_percent: float) -> float:
    base = 0.01 * random_baseline_percent
    return (accuracy - base) / (1.0 - base)


# ---------------------------------------------------------------- the bundle

def find_bundle(given: str | Path | None) -> Path | None:
    """The bundle folder: --bundle when given, else DEFAULT_BUNDLE where it holds core.yaml, else None."""
    if given:
        return Path(given)
    return DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "core.yaml").is_file() else None


def load_bundle(folder: str | Path) -> list[CoreTask]:
    """The bundle's tasks with their data files and random baselines; a one-line UsageError for a
    missing or malformed file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--bundle {folder} is not a folder: {BUNDLE_HELP}")
    config = _read_yaml(folder / "core.yaml")
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise UsageError(f"{folder / 'core.yaml'} has no icl_tasks list: not the CORE eval bundle")
    baselines = _read_baselines(folder / "eval_meta_data.csv")
    return [_task(folder, i, entry, baselines) for i, entry in enumerate(tasks)]


def _read_yaml(path: Path) -> object:
    import yaml

    if not path.is_file():
        raise UsageError(f"{path} is missing: {BUNDLE_HELP}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"cannot read {path} as YAML ({first})") from None


def _read_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UsageError(f"{path} is missing (it holds each task's random baseline): {BUNDLE_HELP}")
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"cannot read {path} ({error})") from None
    if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
        raise UsageError(f"{path} lacks the columns 'Eval Task' and 'Random baseline'")
    out = {}
    for number, row in enumerate(rows, start=2):
        try:
            value = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise UsageError(f"{path}, line {number}: random baseline {row['Random baseline']!r} is not a "
                             "number") from None
        if not (math.isfinite(value) and 0 <= value < 100):
            raise UsageError(f"{path}, line {number}: random baseline {value} is not a percentage below 100")
        out[row["Eval Task"]] = value
    return out


def _task(folder: Path, index: int, entry: object, baselines: dict[str, float]) -> CoreTask:
    where = f"{folder / 'core.yaml'}, task {index + 1}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where} is not a mapping")
    label, kind, uri = entry.get("label"), entry.get("icl_task_type"), entry.get("dataset_uri")
    if not isinstance(label, str) or not isinstance(uri, str):
        raise UsageError(f"{where} lacks a label or a dataset_uri")
    if kind not in KINDS:
        raise UsageError(f"{where} ({label}): icl_task_type {kind!r} is not one of {', '.join(KINDS)}")
    shots = entry.get("num_fewshot", [0])
    shots = shots[0] if isinstance(shots, list) and shots else shots  # the bundle lists one setting per task
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise UsageError(f"{where} ({label}): num_fewshot {entry.get('num_fewshot')!r} is not a whole number ≥ 0")
    delimiter = entry.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise UsageError(f"{where} ({label}): continuation_delimiter is not text")
    if label not in baselines:
        raise UsageError(f"{folder / 'eval_meta_data.csv'} has no random baseline for task {label!r}")
    path = folder / "eval_data" / uri
    if not path.is_file():
        raise UsageError(f"{path} is missing (task {label}): {BUNDLE_HELP}")
    return CoreTask(label, kind, path, shots, delimiter, baselines[label])


def read_examples(task: CoreTask, max_per_task: int | None = None) -> list[dict]:
    """The task's examples, checked, in nanochat's shuffled order, cut to max_per_task."""
    examples = []
    try:
        with task.path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    examples.append(_check_example(task, number, line))
    except OSError as error:
        raise UsageError(f"cannot read {task.path}: {error.strerror or error}") from None
    random.Random(SHUFFLE_SEED).shuffle(examples)
    if max_per_task is not None:
        examples = examples[:max_per_task]
    if not examples:
        raise UsageError(f"{task.path} holds no examples (task {task.label})")
    if task.num_fewshot > len(examples) - 1:
        raise UsageError(f"task {task.label} asks for {task.num_fewshot} few-shot examples but has only "
                         f"{len(examples)} examples{' after --max-per-task' if max_per_task else ''}: give more")
    return examples


def _check_example(task: CoreTask, number: int, line: bytes) -> dict:
    where = f"{task.path}, line {number}"
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise UsageError(f"{where}: not JSON ({error})") from None
    need = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}[task.kind]
    if not isinstance(row, dict) or any(key not in row for key in need):
        raise UsageError(f"{where}: a {task.kind} example needs the fields {', '.join(need)}")
    options = row.get("choices", row.get("context_options"))
    texts = [row[k] for k in need if k not in ("choices", "context_options", "gold")]
    if options is not None:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise UsageError(f"{where}: {need[0] if task.kind == 'schema' else 'choices'} must be a non-empty list "
                             "of strings")
        gold = row["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise UsageError(f"{where}: gold {gold!r} is not the index of one of its {len(options)} options")
    if not all(isinstance(t, str) for t in texts):
        raise UsageError(f"{where}: {', '.join(k for k in need if k not in ('gold',))} must be strings")
    if task.kind == "language_modeling" and not row["continuation"]:
        raise UsageError(f"{where}: the continuation is empty")
    return row


# ---------------------------------------------------------------- prompts

def fewshot_for(examples: list[dict], index: int, shots: int) -> list[dict]:
    if shots <= 0:
        return []
    others = [i for i in range(len(examples)) if i != index]
    return [examples[i] for i in random.Random(FEWSHOT_SEED + index).sample(others, shots)]


def render(kind: str, item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """The prompts of one example: one per option (multiple choice, schema), or the prompt without
    and with the continuation (language modelling)."""
    if kind == "multiple_choice":
        head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{delimiter}"
    # stripped: trailing spaces would otherwise merge into the continuation's first token
    return [without.strip(), without + item["continuation"]]


def _common(seqs: list[list[int]], from_end: bool) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        at = -1 - i if from_end else i
        if any(s[at] != seqs[0][at] for s in seqs):
            return i
    return n


def example_rows(tokenizer: Tokenizer, kind: str, prompts: list[str]) -> list[Row]:
    """Token rows and the span each scores."""
    seqs = tokenizer.encode_batch(prompts, prepend_bos=True)
    if kind == "multiple_choice":
        start = _common(seqs, from_end=False)
        return [Row(s, max(start, 1), len(s)) for s in seqs]
    if kind == "schema":
        suffix = _common(seqs, from_end=True)
        return [Row(s, max(len(s) - suffix, 1), len(s)) for s in seqs]
    without, with_ = seqs
    # nanochat requires the prompt without to be a prefix of the one with; where a tokenizer merges
    # across the boundary, the span starts after what the two share
    start = len(without) if with_[:len(without)] == without else _common(seqs, from_end=False)
    return [Row(with_, max(start, 1), len(with_))]


def task_rows(tokenizer: Tokenizer, task: CoreTask, examples: list[dict]) -> list[list[Row]]:
    return [example_rows(tokenizer, task.kind, render(task.kind, item, task.delimiter,
                                                      fewshot_for(examples, i, task.num_fewshot)))
            for i, item in enumerate(examples)]


# ---------------------------------------------------------------- scoring

def score_task(model, tokenizer: Tokenizer, task: CoreTask, examples: list[dict], batch_tokens: int = BATCH_TOKENS,
               on_rows: Callable[[int], None] | None = None) -> TaskScore:
    rows = task_rows(tokenizer, task, examples)
    flat = [row for example in rows for row in example]
    scored = iter(score_rows(model, flat, tokenizer.bos_id, batch_tokens, on_rows))
    predictions, correct = [], []
    for item, example in zip(examples, rows, strict=True):
        results = [next(scored) for _ in example]
        if task.kind == "language_modeling":
            row = example[0]
            predictions.append(-1)
            correct.append(results[0].greedy and row.end > row.start)
            continue
        means = [r.losses.mean().item() for r in results]  # float32 means, nan for an empty span, as nanochat
        choice = means.index(min(means))
        predictions.append(choice)
        correct.append(choice == item["gold"])
    accuracy = sum(correct) / len(correct)
    return TaskScore(task.label, accuracy, centered(accuracy, task.random_baseline), len(examples), predictions,
                     correct)


def rows_in(task: CoreTask, examples: list[dict]) -> int:
    """How many rows scoring the task runs: one per option, one per language-modelling example."""
    if task.kind == "language_modeling":
        return len(examples)
    key = "choices" if task.kind == "multiple_choice" else "context_options"
    return sum(len(e[key]) for e in examples)


def core_score(scores: list[TaskScore]) -> float:
    return sum(s.centered for s in scores) / len(scores)
