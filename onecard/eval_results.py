"""RUN_DIR/eval.json: what `onecard eval` measured on a run, read back by `onecard report`.

Plain Python, no PyTorch. One JSON object:

  {"format": 1, "weights": "step N" (the weights scored; absent in older files),
   "tasks": {NAME: {"metric": ..., "value": ..., "examples": ..., "seconds": ...,
                    "examples_per_s": ..., "max_per_task": ..., "device": ..., "when": ...}},
   "chatcore": {"value": ..., "centered": {...}, "partial": ...} | absent}

NAME is bpb, core (with each CORE task under "tasks"), arc-easy, arc-challenge, mmlu, gsm8k, humaneval
or lm-eval:TASK.

A task evaluated again replaces its entry; the others stay, unless they scored other weights.
ChatCORE is nanochat's (scripts/chat_eval.py of its October 2025 release, seen in copies found with
the search tool): the mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of (accuracy -
baseline) / (1 - baseline), baselines 0.25 for the four-way multiple-choice tasks and 0 for the
open-ended ones, given only when all five are there. (Later nanochat adds SpellingBee as a sixth
task; onecard does not have it.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from onecard.errors import UsageError
from onecard.units import finite_number

FILE = "eval.json"
FORMAT = 1
CHAT_BASELINES = {"arc-easy": 0.25, "arc-challenge": 0.25, "mmlu": 0.25, "gsm8k": 0.0, "humaneval": 0.0}
GPT2_CORE = 0.256525  # GPT-2 1.5B, as nanochat reports it
# The report card's columns: (heading, task or aggregate in eval.json); bpb is validation bits per byte
CARD = [("val bpb", "bpb"), ("CORE", "core"), ("ARC-E", "arc-easy"), ("ARC-C", "arc-challenge"), ("MMLU", "mmlu"),
        ("GSM8K", "gsm8k"), ("HumanEval", "humaneval"), ("ChatCORE", "chatcore")]


def read(run_dir: Path) -> dict:
    """The run's eval.json, or an empty record; a damaged one reads as empty (report never fails on it)."""
    try:
        data = json.loads((Path(run_dir) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {"format": FORMAT, "tasks": {}}
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        return {"format": FORMAT, "tasks": {}}
    return data


def chatcore(tasks: dict) -> dict | None:
    """ChatCORE from the five chat tasks' accuracies, or None unless all five were measured."""
    values = {name: finite_number(tasks.get(name, {}).get("value")) for name in CHAT_BASELINES}
    if any(v is None for v in values.values()):
        return None
    centered = {name: (v - CHAT_BASELINES[name]) / (1 - CHAT_BASELINES[name]) for name, v in values.items()}
    partial = any(tasks[name].get("max_per_task") for name in CHAT_BASELINES)
    return {"value": sum(centered.values()) / len(centered), "centered": centered, "partial": partial}


def weights_scored(info: dict) -> str | None:
    """Which weights of a folder are scored ("step N", from weights.load_weights' info), so that eval.json
    never sets one checkpoint's scores beside another's; None where the folder holds one model only."""
    if info["layout"] == "nanochat":
        return f"step {info['step']}"
    steps = (info["config"].results or {}).get("steps") if info["layout"] == "onecard" else None
    return None if steps is None else f"step {steps}"


def merge(run_dir: Path, results: dict[str, dict], weights: str | None = None) -> dict:
    """Add `results` (task name -> entry) to the run's eval.json, recompute ChatCORE, write it atomically.
    `weights` names the weights scored (their step): scores of other weights in the folder (a nanochat
    checkpoint folder that gained a later model_*.pt) are dropped, not set beside these."""
    record = read(run_dir)
    if weights is not None and record.get("weights") not in (None, weights):
        record = {"tasks": {}}
    record["format"] = FORMAT
    if weights is not None:
        record["weights"] = weights
    record["tasks"].update(results)
    found = chatcore(record["tasks"])
    if found is not None:
        record["chatcore"] = found
    path = Path(run_dir) / FILE
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
    return record


def card_value(record: dict, key: str) -> float | None:
    """A report-card cell's value, or None where it was not measured."""
    entry = _entry(record, key)
    return finite_number(entry.get("value")) if entry else None


def card_partial(record: dict, key: str) -> bool:
    """Whether the cell was measured on --max-per-task examples only (bpb never is: --bpb-tokens bounds it,
    and eval records --max-per-task in its entry all the same)."""
    entry = _entry(record, key)
    return key != "bpb" and bool(entry and (entry.get("partial") or entry.get("max_per_task")))


def _entry(record: dict, key: str) -> dict | None:
    tasks = record.get("tasks")
    entry = record.get(key) if key == "chatcore" else tasks.get(key) if isinstance(tasks, dict) else None
    return entry if isinstance(entry, dict) else None
