"""Conversations in nanochat's chat format: reading them, checking them, and rendering them into
token ids with the mask that says which tokens the model learns to write.

    <|bos|> <|user_start|> … <|user_end|> <|assistant_start|> … <|assistant_end|> …

A system message is merged into the first user turn; roles alternate, user first. The mask is 1
on the assistant's text, its python blocks (<|python_start|> … <|python_end|>) and
<|assistant_end|>; 0 on bos, the user turns, <|assistant_start|> and the tool's output
(<|output_start|> … <|output_end|>), which at chat time comes from the calculator, not the model.
The format is nanochat's (karpathy/nanochat, nanochat/tokenizer.py at commit fae3aca); a test
proves the ids and mask equal its render_conversation where that code is at hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from onecard.datasources import FILE_SETS
from onecard.errors import UsageError
from onecard.tokenizer import Tokenizer

PART_TYPES = ("text", "python", "python_output")
CONVERSATION_SUFFIXES = (".jsonl", ".json", ".parquet")
# The columns of the task datasets `onecard data download` fetches, whose rows train as conversations
TASK_COLUMNS = tuple(columns for s in FILE_SETS.values() for columns in s.columns if columns != ("messages",))
# How the calculator's tokens read on a screen or in an API reply: [calculator: 6*7 = 42]
TOOL_SHOWN = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " = ",
              "<|output_end|>": "]"}
# A calculator call or its output in a reply's decoded text, closed or cut off at the end
TOOL_PART = re.compile(r"<\|python_start\|>(?P<python>.*?)(?:<\|python_end\|>|\Z)"
                       r"|<\|output_start\|>(?P<python_output>.*?)(?:<\|output_end\|>|\Z)", re.DOTALL)


class BadConversation(ValueError):
    """A conversation onecard cannot train on; the message says why in a few words."""


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]
    truncated: bool  # longer than the context: cut at max_tokens


def _check_content(content: object, role: str, index: int, training: bool) -> None:
    if role == "user" or isinstance(content, str):
        if not isinstance(content, str):
            raise BadConversation(f"content that is not text: message {index} ({role})")
        if training and role == "assistant" and not content.strip():
            raise BadConversation(f"empty assistant turn: message {index}")
        return
    if not isinstance(content, list) or not content:
        raise BadConversation(f"content neither text nor a list of parts: message {index} (assistant)")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise BadConversation(f"a part that is not {{type: {'|'.join(PART_TYPES)}, text: ...}}: "
                                  f"message {index}")
    if training and not any(p["text"].strip() for p in content if p["type"] != "python_output"):
        raise BadConversation(f"empty assistant turn: message {index}")


def joined_text(content: object) -> str | None:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts joined;
    None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def show_tool_calls(text: str) -> str:
    """Decoded model text with its calculator tokens written as people read them (TOOL_SHOWN)."""
    for token, shown in TOOL_SHOWN.items():
        text = text.replace(token, shown)
    return text


def reply_content(text: str) -> str | list[dict]:
    """A reply as the model wrote it (decoded, its calculator tokens by name) -> its content in the
    conversation: the text, or parts that render back into the same special tokens. A reply cut
    short (Ctrl-C) may leave a call open: what follows its start is that part."""
    parts, at = [], 0
    for match in TOOL_PART.finditer(text):
        if match.start() > at:
            parts.append({"type": "text", "text": text[at:match.start()]})
        kind = "python" if match.group("python") is not None else "python_output"
        parts.append({"type": kind, "text": match.group(kind)})
        at = match.end()
    if not parts:
        return text
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts


def normalize(raw: object, training: bool = True) -> list[dict]:
    """{"messages": [...]} or a bare list of messages -> the messages, checked, system merged into
    the first user turn, OpenAI's text parts of a system or user message joined. Raises
    BadConversation. An empty or missing assistant turn teaches nothing, so training refuses it; a
    chat's history keeps what the model replied, blank or not."""
    messages = raw.get("messages") if isinstance(raw, dict) else raw
    if not isinstance(messages, list) or not messages:
        raise BadConversation("no messages (expected {\"messages\": [...]} or a list of messages)")
    if not all(isinstance(m, dict) for m in messages):
        raise BadConversation("a message is not an object with role and content")
    messages = [dict(m) for m in messages]
    for message in messages:  # OpenAI's text parts (an assistant's parts are onecard's own, checked below)
        text = joined_text(message.get("content")) if message.get("role") in ("system", "user") else None
        if text is not None:
            message["content"] = text
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise BadConversation("a system message must be followed by a user message")
        if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
            raise BadConversation("system and user messages hold text")
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise BadConversation(f"roles out of order: message {i} is {message.get('role')!r}, expected {expected}")
        _check_content(message.get("content"), expected, i, training)
    if training and len(messages) < 2:  # roles alternate from the user's: no second message, no reply to learn
        raise BadConversation("no assistant turn")
    return messages


def render(tokenizer: Tokenizer, messages: list[dict], max_tokens: int | None = None) -> Rendered:
    """Token ids and mask of normalized messages, cut at max_tokens."""
    special = tokenizer.special_id
    ids, mask = [tokenizer.bos_id], [0]

    def add(tokens: list[int], value: int) -> None:
        ids.extend(tokens)
        mask.extend([value] * len(tokens))

    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            add([special("<|user_start|>")] + tokenizer.encode(content) + [special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            tokens = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(tokens, 1)
            elif part["type"] == "python":
                add([special("<|python_start|>")] + tokens + [special("<|python_end|>")], 1)
            else:  # the tool's output: written by the calculator at chat time, not learned
                add([special("<|output_start|>")] + tokens + [special("<|output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    truncated = max_tokens is not None and len(ids) > max_tokens
    if truncated:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return Rendered(ids, mask, truncated)


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far, ending with <|assistant_start|>: what the model continues in a chat.
    `messages` ends with a user turn."""
    return render(tokenizer, messages).ids + [tokenizer.special_id("<|assistant_start|>")]


# ---------------------------------------------------------------- files

def read_file(path: Path) -> Iterator[tuple[int, str, object]]:
    """(line or row number, where it is: "a.jsonl, line 3", raw conversation) of a .jsonl file (an
    object with "messages", or a bare list of messages, per line), a .json file (a list of such
    conversations, or one; else read as JSON lines) or a .parquet file with a `messages` column
    (lists of structs, or JSON text).
    Malformed JSON comes as a BadConversation naming the line, in place of the conversation: a
    reader that skips it goes on with the next."""
    suffix = path.suffix.lower()  # CHATS.JSONL too
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if suffix not in CONVERSATION_SUFFIXES:
        raise UsageError(f"{path}: conversations come as .jsonl, .json or .parquet files")
    try:
        document = _json_document(path) if suffix == ".json" else None
        if document is not None:
            for number, conversation in enumerate(document, start=1):
                yield number, f"{path}, conversation {number}", conversation
            return
        with path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                yield number, where, _parse(line, where)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None


def _parse(text: str | bytes, where: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply
        return BadConversation(f"{where}: not JSON ({error})")


def _json_document(path: Path) -> list | None:
    """The conversations of a .json file that is one JSON document: a list of conversations, or
    one conversation. None when it is not one document (JSON lines under a .json name). A file
    whose first line is not JSON either is a broken document: its own error says where it breaks."""
    text = path.read_bytes()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        if text.strip() and isinstance(_parse(text.lstrip().split(b"\n", 1)[0], ""), BadConversation):
            raise UsageError(f"{path}: not JSON ({error})") from None
        return None
    one = not isinstance(data, list) or (data and isinstance(data[0], dict) and "role" in data[0])
    return [data] if one else data


def _read_parquet(path: Path) -> Iterator[tuple[int, str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if "messages" not in names:  # a task dataset's or ShareGPT's rows, made conversations later
            if not any(set(columns) <= set(names) for columns in (*TASK_COLUMNS, ("conversations",))):
                raise UsageError(f"{path} has neither a 'messages' nor a 'conversations' column, nor a task's "
                                 f"columns (it has {', '.join(names)})")
            for number, row in enumerate(_rows(table), start=1):
                yield number, f"{path}, row {number}", row
            return
        row = 0
        for group in range(table.num_row_groups):
            for value in table.read_row_group(group, columns=["messages"]).column("messages").to_pylist():
                row += 1
                where = f"{path}, row {row}"
                yield row, where, _parse(value, where) if isinstance(value, str) else value
    except UsageError:
        raise
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{path} is not a readable parquet file ({first})") from None


def _rows(table) -> Iterator[dict]:
    for group in range(table.num_row_groups):
        yield from table.read_row_group(group).to_pylist()
