"""The chat model's tool: a calculator for what the model writes between <|python_start|> and
<|python_end|>. It evaluates what nanochat's tool accepts — arithmetic with + - * / // and
parentheses, and the string method .count() (karpathy/nanochat, nanochat/engine.py at commit
92d63d4) — by walking the expression's syntax tree: model text is never given to eval or exec.

Bounds keep every call short in any thread (no SIGALRM): the expression's length, its number of
nodes and depth, the size of numbers and strings, and a deadline checked at every node.
"""

from __future__ import annotations

import ast
import operator
import re
import time
import warnings

MAX_CHARS = 1000
MAX_NODES = 200
MAX_DEPTH = 32
MAX_MAGNITUDE = 1e100  # larger numbers are refused: products of such are still instant
MAX_STRING = 10_000
TIME_LIMIT_S = 0.1

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# Model text such as "1if x" makes the parser warn on stderr, in the middle of a chat. The filter is
# added once, here, and matches only what this module parses (its own file name): catch_warnings,
# which would change the filters for every thread of a server while it parses, is not needed.
SOURCE_NAME = "<calculator>"
warnings.filterwarnings("ignore", category=SyntaxWarning, module=re.escape(SOURCE_NAME) + r"\Z")


class Refused(Exception):
    """The expression is outside what the calculator evaluates."""


def calculate(expression: str) -> str | None:
    """The value as text, or None where the expression is refused or fails (as nanochat's tool)."""
    text = expression.replace(",", "").strip()  # 1,000 means 1000 to people and to nanochat's tool
    if not text or len(text) > MAX_CHARS:
        return None
    try:
        tree = ast.parse(text, filename=SOURCE_NAME, mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
            return None
        value = _evaluate(tree.body, 0, time.monotonic() + TIME_LIMIT_S)
    except (Refused, SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError):
        return None
    return str(value)


def _check(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Refused("not a number or a string")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise Refused("string too long")
    if not isinstance(value, str) and abs(value) > MAX_MAGNITUDE:
        raise Refused("number too large")
    return value


def _evaluate(node: ast.AST, depth: int, deadline: float) -> object:
    if depth > MAX_DEPTH or time.monotonic() > deadline:
        raise Refused("too deep or too slow")
    if isinstance(node, ast.Constant):
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left, depth + 1, deadline), _evaluate(node.right, depth + 1, deadline)
        if isinstance(left, str) or isinstance(right, str):
            raise Refused("arithmetic on strings")
        return _check(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        operand = _evaluate(node.operand, depth + 1, deadline)
        if isinstance(operand, str):
            raise Refused("arithmetic on strings")
        return _check(UNARY[type(node.op)](operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        subject = _evaluate(node.func.value, depth + 1, deadline)
        needle = _evaluate(node.args[0], depth + 1, deadline)
        if not (isinstance(subject, str) and isinstance(needle, str)):
            raise Refused(".count() counts a string in a string")
        return subject.count(needle)
    raise Refused(f"{type(node).__name__} is not allowed")
