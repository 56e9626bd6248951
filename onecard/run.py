"""The run directory: what a run is (typed, stored as JSON with a format version), who holds it
(an exclusive lock), and the files it writes beside its checkpoints.

  config.json    RunConfig: model, recipe, settings, corpus, the planner's prediction, results
  summary.json   status and the meters' totals (written by the loop)
  log.jsonl      one JSON object a line (the schema is in onecard/loop.py)
  model.safetensors, tokenizer/   the final weights and the tokenizer
  .lock          held by the process training in the directory
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

from onecard import defaults, durable
from onecard.errors import UsageError
from onecard.model_config import GPTConfig
from onecard.plan.choose import Prediction
from onecard.recipe import Recipe
from onecard.units import finite_number

FORMAT = 1  # config.json's format version: a newer onecard reads older ones


@dataclass
class TrainSettings:
    run_dir: Path
    steps: int
    total_batch: int
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 50
    eval_batches: int = defaults.EVAL_BATCHES
    # validation rows per evaluation, fixed when the run starts (eval_batches x its micro-batch): a
    # resume with another micro-batch scores the same text (set by session.prepare)
    eval_rows: int | None = None
    sample_tokens: int = 48
    # the classic's learning rates; None where the family sets its own (nanochat-2026, optim_2026.py)
    matrix_lr: float | None = 0.02
    embedding_lr: float | None = 0.2
    unembedding_lr: float | None = 0.004
    # fine-tuning's share of pre-training's learning rates: the classic's rates above already carry it;
    # nanochat-2026 sets its own rates and takes this (with no weight decay) where it is below 1
    lr_fraction: float = 1.0
    grad_clip: float = 1.0  # the gradient norm's ceiling; 0: no clipping
    sample_prompt: str = ""
    data: str | None = None  # the corpus as given (None: embedded), so that a resume finds it again
    save_every_min: float = defaults.SAVE_EVERY_MIN  # checkpoint every so many minutes (0: off) ...
    save_every_steps: int = 0  # ... and/or every so many steps (0: off); always at the end
    keep: int = defaults.KEEP  # checkpoints kept
    force_new: bool = False  # start over even though the run directory holds a checkpoint
    price: float | None = None  # per kWh
    currency: str = defaults.CURRENCY
    power_watts: float | None = None  # stated power for an energy estimate when NVML cannot measure
    max_bad_steps: int = 5  # non-finite steps in a row that stop the run
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this session

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        """Raises UsageError (one line) for a value of the wrong JSON type."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for f in fields(cls):
            if f.name in values:
                check_json_type(f"train.{f.name}", values[f.name], str(f.type))
        values["run_dir"] = Path(values.get("run_dir", "."))
        return cls(**values)


_JSON_TYPES = {"str": (str,), "Path": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
               "None": (type(None),)}


def check_json_type(name: str, value: object, annotation: str) -> object:
    """`value`, read from JSON, if it fits a field annotated `int`, `str | None` and so on; else a
    UsageError naming the field."""
    allowed = [t for part in annotation.split("|") for t in _JSON_TYPES.get(part.strip(), (object,))]
    # JSON's true and false are ints to Python: only a bool field takes them
    fits = bool in allowed or object in allowed if isinstance(value, bool) else isinstance(value, tuple(allowed))
    if not fits:
        raise UsageError(f"{name} is {value!r}, not {annotation}")
    return value


@dataclass
class RunConfig:
    model_config: GPTConfig
    recipe: Recipe
    train: TrainSettings
    corpus: str
    params: int
    flops_per_token: int
    prediction: Prediction | None = None
    results: dict | None = None
    stage: str = "pretrain"  # pretrain | sft
    init_from: str | None = None  # the run or checkpoint the weights came from
    format: int = FORMAT
    extra: dict = field(default_factory=dict)  # keys a newer onecard wrote: kept, not read

    def __post_init__(self) -> None:
        if self.model_config.arch != "classic":  # not the classic's rates, which its files used to record
            self.train = replace(self.train, matrix_lr=None, embedding_lr=None, unembedding_lr=None)

    def to_dict(self) -> dict:
        out = {"format": self.format, "stage": self.stage, "init_from": self.init_from,
               "model_config": self.model_config.to_dict(), "recipe": self.recipe.to_dict(),
               "train": self.train.to_dict(), "corpus": self.corpus, "params": self.params,
               "flops_per_token": self.flops_per_token,
               "prediction": self.prediction.to_dict() if self.prediction else None, **self.extra}
        if self.results is not None:
            out["results"] = self.results
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "config.json") -> RunConfig:
        """Raises UsageError (one line) for a config this onecard cannot read."""
        if not isinstance(data, dict):
            raise UsageError(f"{where} is not a JSON object")
        try:
            known = {f.name for f in fields(cls)}
            return cls(model_config=GPTConfig(**data["model_config"]), recipe=Recipe.from_dict(data["recipe"]),
                       train=TrainSettings.from_dict(data["train"]), corpus=str(data["corpus"]),
                       params=int(data.get("params", 0)), flops_per_token=int(data.get("flops_per_token", 0)),
                       prediction=Prediction.from_dict(data.get("prediction")), results=data.get("results"),
                       stage=str(data.get("stage", "pretrain")),
                       init_from=check_json_type("init_from", data.get("init_from"), "str | None"),
                       format=int(data.get("format", 0)), extra={k: v for k, v in data.items() if k not in known})
        except UsageError as error:
            raise UsageError(f"{where}: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UsageError(f"{where} is not an onecard run description ({type(error).__name__}: {error})") from None


def read_config(path: Path) -> RunConfig:
    """config.json (or a checkpoint's copy) as a RunConfig; a one-line UsageError if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} ({type(error).__name__}: {error})") from None
    return RunConfig.from_dict(data, str(path))


# Where nanochat keeps each phase's checkpoints: <base dir>/<folder>/dNN
# (karpathy/nanochat, nanochat/checkpoint_manager.py at commit fae3aca)
NANOCHAT_PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                       "rl": "chatrl_checkpoints"}
CHAT_PHASES = ("mid", "sft", "rl")  # mid-training already teaches nanochat's conversation format


def model_phase(path: str | Path) -> str | None:
    """What a model directory says it holds: "base", "mid", "sft" or "rl". An onecard run (or one of its
    checkpoints) by its stage, a transformers export by the phase it recorded, a nanochat checkpoint by
    the folder it sits in; None when it does not say."""
    path = Path(path)
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("onecard_phase") in NANOCHAT_PHASE_DIRS:  # a transformers export
        return data["onecard_phase"]
    if isinstance(data, dict) and "model_config" in data:  # an onecard run's config
        try:
            return "sft" if RunConfig.from_dict(data, str(path / "config.json")).stage == "sft" else "base"
        except UsageError:
            pass
    folder = path.resolve().parent.name
    return next((phase for phase, name in NANOCHAT_PHASE_DIRS.items() if name == folder), None)


def newest_run(stage: str, root: Path = Path("runs")) -> Path | None:
    """The newest finished run of a stage (pretrain | sft) under ./runs: what `onecard sft` and
    `onecard chat` take when no run is named."""
    found = []
    for path in root.glob("*/model.safetensors") if root.is_dir() else []:
        try:
            if read_config(path.parent / "config.json").stage == stage:
                found.append((path.stat().st_mtime, path.parent))
        except (UsageError, OSError):
            continue
    return max(found)[1] if found else None


def read_json(path: Path) -> dict:
    """A JSON object from a file, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Replace a small JSON file atomically and durably: a reader never sees half of it, and a power
    cut leaves the old file or the new one."""
    text = json.dumps(data, indent=2) + "\n"
    durable.write_via_temporary(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- who holds the directory

class RunLock:
    """An exclusive lock on a run directory for as long as a process trains in it.

    The operating system's file lock (filelock) is released when the process dies, however it
    dies, so a stale lock never blocks; the holder's pid is written beside it for the message."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.lock = FileLock(str(run_dir / ".lock"), timeout=0)
        self.owner = run_dir / ".lock.owner"

    def __enter__(self) -> RunLock:
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except Timeout:
            raise UsageError(f"{self.run_dir} is in use by another onecard process{self._holder()}: wait for it "
                             "to finish or stop it, or choose another --run-dir") from None
        except OSError as error:
            raise UsageError(f"cannot use {self.run_dir} as a run directory: {error.strerror or error}") from None
        try:
            self.owner.write_text(f"{os.getpid()}\n")
        except OSError:
            pass  # the lock holds; only the message for a second process loses the pid
        return self

    def _holder(self) -> str:
        try:
            pid = int(self.owner.read_text().strip())
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})"

    def __exit__(self, *exc) -> None:
        self.lock.release()
        try:  # a command that failed before writing anything leaves no directory behind
            if self.created and {p.name for p in self.run_dir.iterdir()} <= {".lock", ".lock.owner"}:
                for name in (".lock", ".lock.owner"):
                    (self.run_dir / name).unlink(missing_ok=True)
                self.run_dir.rmdir()
        except OSError:  # the directory deleted or moved meanwhile: the error that says so stands
            pass


# ---------------------------------------------------------------- resuming

# What a resumed run must share with the run that wrote the checkpoint. The rest may change
# between sessions: steps, device, evaluation, saving, price, power, and the recipe's memory
# choices and micro-batch (weights and optimizer states convert; the math is the same, the
# rounding is not bitwise).
SAME_TRAIN = ("total_batch", "seed", "matrix_lr", "embedding_lr", "unembedding_lr", "grad_clip")


def model_conflicts(saved: GPTConfig, config: GPTConfig) -> list[str]:
    # every field, the family's too (to_dict leaves a classic model's arch out of its files)
    before, now = asdict(saved), asdict(config)
    return [f"model {key} {before.get(key)} -> {value}" for key, value in now.items() if before.get(key) != value]


def corpus_fingerprint(described: str) -> str:
    """What identifies a corpus in its description (its files and sizes, its split), not its path: a
    corpus may move to another disk."""
    found = re.search(r"fingerprint \w+, validation fraction \S+", described)
    return found.group(0) if found else described


def conflicts(saved: RunConfig, config: RunConfig) -> list[str]:
    """How `config` differs from the checkpoint's config where a resume cannot follow."""
    out = model_conflicts(saved.model_config, config.model_config)
    if saved.recipe.seq_len != config.recipe.seq_len:
        out.append(f"seq_len {saved.recipe.seq_len} -> {config.recipe.seq_len}")
    for key in SAME_TRAIN:
        if getattr(saved.train, key) != getattr(config.train, key):
            out.append(f"{key} {getattr(saved.train, key)} -> {getattr(config.train, key)}")
    if corpus_fingerprint(saved.corpus) != corpus_fingerprint(config.corpus):
        out.append(f"corpus {saved.corpus} -> {config.corpus}")
    if saved.init_from and config.init_from and Path(saved.init_from).resolve() != Path(config.init_from).resolve():
        out.append(f"started from {saved.init_from} -> {config.init_from}")
    return out


def resume_command(command: str, run_dir: Path, ranks: int, threads: int | None, device: str | None = None) -> str:
    """The command that resumes a run as it was started: under torchrun with as many ranks, on the
    --device given, with the same --threads (a CPU run's sums, hence its weights, depend on the
    thread count)."""
    start = f"torchrun --standalone --nproc_per_node {ranks} -m onecard.cli" if ranks > 1 else "onecard"
    return (f"{start} {command} --run-dir {shlex.quote(str(run_dir))}" + (f" --device {device}" if device else "")
            + (f" --threads {threads}" if threads else ""))


def last_checkpoint_words(result: dict, run_dir: Path) -> str:
    step = result["last_checkpoint"]
    return f"no checkpoint of this run in {run_dir}/" if step is None else \
        f"last complete checkpoint: step {step} in {run_dir}/"


# What a run writes into its directory (an eval and a report add theirs): all that a run started over moves
RUN_FILES = ("config.json", "log.jsonl", "summary.json", "tokenizer", "model.safetensors", "latest", "checkpoints",
             "eval.json", "report", ".tokenizer-for-ranks")


def set_aside(run_dir: Path, only_run_files: bool = False) -> Path:
    """Move an earlier run's files into run_dir/previous-<time>/: --force-new deletes nothing.
    only_run_files: the run's own files alone (RUN_FILES and their .tmp), not what else the folder holds."""
    stamp = f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside = run_dir / stamp
    taken = 1
    while True:  # two set-asides in one second (or a clock set back) get a folder each
        try:
            aside.mkdir()
            break
        except FileExistsError:
            taken += 1
            aside = run_dir / f"{stamp}-{taken}"
    for path in run_dir.iterdir():
        if only_run_files and path.name.removesuffix(".tmp") not in RUN_FILES:
            continue
        if path != aside and not path.name.startswith("previous-") and not path.name.startswith(".lock"):
            path.rename(aside / path.name)
    return aside


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines a crashed session wrote after the checkpoint it resumes from. Every session appends
    from its checkpoint's step on, so those lines are the log's tail: it is read from the end and cut in
    place, and a months-long log is neither read whole nor rewritten on every resume."""
    try:
        log = open(path, "rb+")
    except FileNotFoundError:
        return
    with log:
        end = log.seek(0, os.SEEK_END)
        kept = next((line_end for line_end, line in _lines_from_the_end(log, end) if _up_to(line, step)), None)
        if kept is None:  # not one line at or before the checkpoint
            log.truncate(0)
        elif kept == end:  # a kept last line cut short before its newline: the next line must not join it
            log.seek(end)
            log.write(b"\n")
        elif kept + 1 < end:  # the newline after the last kept line stays
            log.truncate(kept + 1)
        else:
            return  # nothing to drop (a stop wrote its checkpoint last)
        os.fsync(log.fileno())


def _up_to(line: bytes, step: int) -> bool:
    """Whether a log line is whole and at or before `step` (a line without a step counts as step 0)."""
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
        return isinstance(record, dict) and record.get("step", 0) <= step
    except (ValueError, TypeError, RecursionError):  # a line cut short by the crash
        return False


def _lines_from_the_end(file: BinaryIO, end: int, block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """(offset where the line ends, the line) for each line of a binary file, the last first."""
    pos, rest = end, b""
    while True:
        start = max(0, pos - block)
        file.seek(start)
        data = file.read(pos - start) + rest
        parts = data.split(b"\n")
        line_end = start + len(data)
        for part in reversed(parts if start == 0 else parts[1:]):  # parts[0] may begin before `start`
            yield line_end, part
            line_end -= len(part) + 1
        if start == 0:
            return
        pos, rest = start, parts[0]


# ---------------------------------------------------------------- predicted against measured

def compare_rows(prediction: dict, summary: dict, history: list[dict], total_batch: int | None
                 ) -> list[tuple[str, str, str]]:
    """(what, predicted, measured) rows, for the end of a run and for its report. The first step
    (warm-up, compile) is left out of the measured step time: the planner predicts a steady step.
    Values that are missing or damaged show as n/a."""
    gib = 2**30

    def shown(value: float | None, scale: float, unit: str, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value / scale:,.{digits}f}{unit}"

    times = [t for t in (finite_number(r.get("step_time_s")) for r in history[1:] if not r.get("skipped")) if t]
    times = times or [t for t in (finite_number(r.get("step_time_s")) for r in history) if t]
    measured = statistics.median(times) if times else None
    predicted_time = finite_number(prediction.get("step_time_s"))
    rows = [("peak allocated", shown(finite_number(prediction.get("peak_allocated_bytes")), gib, " GiB"),
             shown(finite_number(summary.get("vram_peak_bytes")), gib, " GiB (torch.cuda.max_memory_allocated)")),
            ("peak incl. context", shown(finite_number(prediction.get("peak_bytes")), gib, " GiB"),
             "n/a (not measured by torch)"),
            ("step time", shown(predicted_time, 1, " s", 3),
             "n/a" if measured is None else f"{measured:.3f} s (median of {len(times)} steps)")]
    if measured and total_batch:
        rows.append(("tokens/s", shown(finite_number(prediction.get("tokens_per_s")), 1, "", 0),
                     f"{total_batch / measured:,.0f}"))
    return rows


def compare_text(prediction: dict, summary: dict, history: list[dict], total_batch: int) -> str:
    lines = [f"{'':<20} {'predicted':>12}   measured ({prediction.get('gpu')}, recipe {prediction.get('recipe')})"]
    rows = compare_rows(prediction, summary, history, total_batch)
    lines += [f"{name:<20} {pred:>12}   {meas}" for name, pred, meas in rows]
    return "\n".join(lines)
