"""The OpenAI API's request and response shapes, checked by hand: every bad request becomes an
OpenAI error object with the right status (never FastAPI's own lists of validation details), and
nothing here needs FastAPI, so the checks are tested without a server.

Limits are nanochat's (its chat web server's): 500 messages, 8,000 characters a message, 32,000
in all, temperature 0-2, top-k 1-200, at most 4,096 new tokens; bodies over 1 MB are refused.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import uuid
from dataclasses import dataclass, field, fields

from onecard.conversations import BadConversation, joined_text, normalize
from onecard.engine import Sampling
from onecard.units import NumberError, parse_number

# A calculator call as a reply shows it (conversations.TOOL_SHOWN), read back from the history.
# a calculator call as shown: [calculator: EXPR = RESULT]; the result never holds " = ", "]" or spaces
CALCULATION = re.compile(r"\[calculator: (.*?) = ([^\]\s]*)\]")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}
SEED_RANGE = 2**63
# OpenAI's request fields this server does not implement, with the values that ask for nothing
# (besides null). One asked for is refused by name: ignoring it would answer something else than was
# asked (no tool call, no log-probabilities, text that is not JSON, no penalty).
NOT_IMPLEMENTED = {
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False), "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},),
    "response_format": ({"type": "text"},), "presence_penalty": (0,), "frequency_penalty": (0,),
    "echo": (False,), "best_of": (1,), "suffix": ("",), "modalities": (["text"],), "audio": (),
    "web_search_options": (),
}


@dataclass
class Limits:
    """What one request may ask for; `onecard serve --limit NAME=VALUE` changes any of them."""
    max_messages: int = 500
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000
    max_tokens: int = 4_096
    max_top_k: int = 200
    max_n: int = 8
    max_stops: int = 4
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 30.0

    def with_overrides(self, pairs: list[str] | None) -> Limits:
        """NAME=VALUE pairs over these limits; raises ValueError (one line) for a bad pair."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for pair in pairs or []:
            name, sep, text = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in values:
                raise ValueError(f"--limit {pair!r}: expected NAME=VALUE with NAME one of {', '.join(values)}")
            try:
                value = parse_number(text)
            except NumberError as error:  # its message says why: not a number, not finite, too large
                raise ValueError(f"--limit {pair!r}: {error}") from None
            whole = isinstance(values[name], int)
            if not 0 < value <= 2**53 or (whole and not value.is_integer()):
                raise ValueError(f"--limit {pair!r}: expected a positive {'whole ' if whole else ''}number")
            values[name] = int(value) if whole else value
        return Limits(**values)


class ApiError(Exception):
    """An error the client gets as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked request for /v1/chat/completions (messages) or /v1/completions (prompt)."""
    model: str | None
    sampling: Sampling
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None
    prompt: str | None = None


# ---------------------------------------------------------------- parameters

def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict, name: str, default: float | None, low: float, high: float,
            integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and isinstance(value, float) and math.isfinite(value) and not value.is_integer()):
        raise ApiError(400, f"{name}: expected {kind}, got {value!r:.40}", param=name, code="invalid_type")
    # (no float() of an int: a 400-digit integer is valid JSON and would overflow)
    if (isinstance(value, float) and not math.isfinite(value)) or value > high or value < low:
        shown = (lambda x: f"{x:,}") if integer else (lambda x: f"{x:g}")  # 2**63 - 1 in full, not 9.22e+18
        raise _bad(name, f"expected {kind} from {shown(low)} to {shown(high)}, got {value!r:.40}")
    return int(value) if integer else float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: expected true or false", param=name, code="invalid_type")
    return value


def _stop(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop: expected a non-empty string or a list of them", param="stop", code="invalid_type")
    if len(stops) > limits.max_stops:
        raise _bad("stop", f"at most {limits.max_stops} stop strings")
    if any(len(s) > 200 for s in stops):
        raise _bad("stop", "a stop string is longer than 200 characters")
    return stops


def _refuse_not_implemented(body: dict) -> None:
    for name, nothing in NOT_IMPLEMENTED.items():
        value = body.get(name)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool)
                                         for v in nothing):
            shown = " or ".join(json.dumps(v) for v in [None, *nothing])
            raise ApiError(400, f"{name}: not implemented by this server (leave it out, or send {shown})",
                           param=name, code="unsupported_parameter")


def _sampling(body: dict, limits: Limits) -> Sampling:
    max_tokens = _number(body, "max_completion_tokens", None, 1, limits.max_tokens, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", min(512, limits.max_tokens), 1, limits.max_tokens, integer=True)
    seed = _number(body, "seed", None, -SEED_RANGE, SEED_RANGE - 1, integer=True)  # OpenAI's: any int64
    return Sampling(temperature=_number(body, "temperature", 0.6, 0, 2),
                    top_k=_number(body, "top_k", 50, 1, limits.max_top_k, integer=True),
                    top_p=_number(body, "top_p", 1.0, 0, 1),  # 0, as OpenAI takes it: the most likely token
                    max_tokens=max_tokens,
                    seed=secrets.randbelow(SEED_RANGE) if seed is None else seed % 2**64)  # as torch takes it


def _common(body: object, limits: Limits) -> Request:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model: expected a string", param="model", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options: expected an object", param="stream_options", code="invalid_type")
    _refuse_not_implemented(body)
    return Request(model=model, sampling=_sampling(body, limits),
                   n=_number(body, "n", 1, 1, limits.max_n, integer=True), stop=_stop(body, limits),
                   stream=_flag(body, "stream"), include_usage=_flag(options or {}, "include_usage"))


# ---------------------------------------------------------------- messages and prompts

def _text(content: object, index: int) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    text = joined_text(content)
    if text is not None:
        return text
    raise ApiError(400, f"messages[{index}].content: expected text or a list of text parts",
                   param=f"messages[{index}].content", code="invalid_type")


def _assistant_parts(text: str) -> str | list[dict]:
    """A reply as the server showed it, calculator calls turned back into the model's tool parts."""
    if not CALCULATION.search(text):
        return text
    parts, at = [], 0
    for match in CALCULATION.finditer(text):
        parts += [{"type": "text", "text": text[at:match.start()]}, {"type": "python", "text": match.group(1)},
                  {"type": "python_output", "text": match.group(2)}]
        at = match.end()
    return [p for p in parts + [{"type": "text", "text": text[at:]}] if p["text"] or p["type"] != "text"]


def _alternate(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """OpenAI takes the roles in any order; the model knows one system message, then user and
    assistant in turn. A system message after the first turn goes into the user turn that follows,
    and messages of one role in a row become one turn, their texts a blank line apart. A reply that
    opens the conversation (a chat page's greeting) follows the system text as the user's turn, or
    an empty one."""
    folded: list[tuple[str, str]] = []
    for role, text in turns:
        role = "user" if role == "system" and folded else role
        if folded and folded[-1][0] == role:
            folded[-1] = (role, "\n\n".join(t for t in (folded[-1][1], text) if t))
        else:
            folded.append((role, text))
    if len(folded) > 1 and folded[0][0] == "system" and folded[1][0] == "assistant":
        folded[0] = ("user", folded[0][1])  # where normalize would put the system text anyway
    if folded and folded[0][0] == "assistant":
        folded.insert(0, ("user", ""))
    return folded


def check_messages(raw: object, limits: Limits) -> list[dict]:
    """OpenAI messages -> onecard's normalized conversation, ending with a user turn."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages: expected a non-empty list", param="messages", code="invalid_type")
    if len(raw) > limits.max_messages:
        raise _bad("messages", f"at most {limits.max_messages} messages, got {len(raw)}")
    turns, total = [], 0
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}]: expected an object with role and content",
                           param=f"messages[{i}]", code="invalid_type")
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"expected system, user or assistant, got {message.get('role')!r}")
        text = _text(message.get("content"), i)
        if len(text) > limits.max_message_chars:
            raise _bad(f"messages[{i}].content", f"at most {limits.max_message_chars:,} characters, got {len(text):,}")
        total += len(text)
        turns.append((role, text))
    if total > limits.max_total_chars:
        raise _bad("messages", f"at most {limits.max_total_chars:,} characters in all, got {total:,}")
    messages = [{"role": role, "content": _assistant_parts(text) if role == "assistant" else text}
                for role, text in _alternate(turns)]
    if messages[-1]["role"] != "user":
        raise _bad("messages", "the last message must be the user's: the model answers it")
    try:
        return normalize(messages, training=False)  # a blank reply of the model's own stays in the history
    except BadConversation as error:
        raise _bad("messages", str(error)) from None


def parse_chat(body: object, limits: Limits) -> Request:
    request = _common(body, limits)
    request.messages = check_messages(body.get("messages"), limits)
    return request


def parse_completion(body: object, limits: Limits) -> Request:
    request = _common(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt: expected a string (a list of prompts or token ids is not supported)",
                       param="prompt", code="invalid_type")
    if len(prompt) > limits.max_total_chars:
        raise _bad("prompt", f"at most {limits.max_total_chars:,} characters, got {len(prompt):,}")
    request.prompt = prompt
    return request


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, created: int, texts: list[str], reasons: list[str | None],
             used: dict) -> dict:
    """The whole answer of a request that did not stream; `created` when it was received (Unix seconds)."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": used}


def chunk(chat: bool, rid: str, model: str, created: int, index: int | None, text: str | None = None,
          reason: str | None = None, first: bool = False, used: dict | None = None,
          with_usage: bool = False) -> dict:
    """One streamed event: a piece of choice `index`'s text, its end (reason), or (index None) the usage.
    Every chunk of a stream carries the same `created`, as OpenAI's do."""
    if index is None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]
    else:
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices}
    if with_usage:
        out["usage"] = used
    return out
