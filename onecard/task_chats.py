"""Rows of the public task datasets as conversations to train on, the way nanochat's SFT and
midtraining mixtures turn them into chats (karpathy/nanochat tasks/arc.py and tasks/mmlu.py at commit
6383d5db, tasks/gsm8k.py at commit 23c5171, read with the search tool; written here anew):

  * ARC and MMLU (allenai/ai2_arc; cais/mmlu, whose auxiliary_train rows come wrapped in a `train`
    field): the user asks the multiple-choice prompt `onecard eval` asks, the assistant answers
    with the letter alone;
  * GSM8K (openai/gsm8k): the user asks the question; the assistant gives the worked solution, each
    <<expression=result>> in it becoming a calculator call (the expression, which the model learns
    to write) and its output (the result, which at chat time the calculator computes).

A row already holding "messages" (SmolTalk, the user's own files) passes unchanged; a ShareGPT
row ({"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}, the layout many
public chat sets come in) becomes those messages.
"""

from __future__ import annotations

import re

from onecard.chat_tasks import arc_problem, gsm8k_problem, mmlu_problem
from onecard.conversations import BadConversation
from onecard.errors import UsageError

CALCULATION = re.compile(r"<<([^>]+)>>")  # GSM8K's annotation of a calculation in a solution
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def as_conversation(row: object) -> object:
    """A task row as {"messages": [...]}; anything else as it came (normalize judges it)."""
    if not isinstance(row, dict) or "messages" in row:
        return row
    if isinstance(row.get("conversations"), list):
        return {"messages": [_sharegpt_message(m) for m in row["conversations"]]}
    if isinstance(row.get("train"), dict) and "question" not in row:  # MMLU's auxiliary_train (any other columns)
        row = row["train"]
    if "choices" in row:
        arc = isinstance(row["choices"], dict)
        problem = _checked(arc_problem if arc else mmlu_problem, row, "ARC" if arc else "MMLU")
        return {"messages": [{"role": "user", "content": problem.question},
                             {"role": "assistant", "content": problem.answer}]}
    if "question" in row and "answer" in row:
        problem = _checked(gsm8k_problem, row, "GSM8K")
        return {"messages": [{"role": "user", "content": problem.question},
                             {"role": "assistant", "content": solution_parts(problem.answer)}]}
    return row


def _sharegpt_message(message: object) -> object:
    if not isinstance(message, dict) or "from" not in message:
        return message  # normalize says what is wrong with it
    role = SHAREGPT_ROLES.get(message["from"])
    if role is None:  # tool calls and their results ("function_call", "observation") have no onecard form
        raise BadConversation(f"a ShareGPT message from {message['from']!r}: onecard reads human, gpt and system")
    return {"role": role, "content": message.get("value")}


def solution_parts(solution: str) -> list[dict]:
    """A GSM8K solution as the assistant's parts: text, and for each <<a*b=c>> a calculator call `a*b`
    followed by its output `c` (an annotation without '=' is a call with an empty output)."""
    parts, start = [], 0
    for match in CALCULATION.finditer(solution):
        if match.start() > start:
            parts.append({"type": "text", "text": solution[start:match.start()]})
        expression, equals, result = match.group(1).rpartition("=")
        if not equals:
            expression, result = result, ""
        parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        start = match.end()
    if start < len(solution):
        parts.append({"type": "text", "text": solution[start:]})
    return parts


def _checked(reader, row: dict, task: str):
    try:
        return reader(row, task)
    except UsageError as error:  # "ARC: answerKey 'E' is not one of the labels [...]"
        raise BadConversation(f"not a usable {task} row: {str(error).removeprefix(task + ': ')}") from None
