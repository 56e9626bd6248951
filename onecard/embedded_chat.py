"""The embedded SFT set: conversations made on the spot from what every Python install has, so
that `onecard sft` runs with no download right after the CPU demo.

- questions about the standard library's functions, answered with the first sentence of their
  docstrings (read with `ast`, nothing imported);
- arithmetic questions answered with the calculator tool, as nanochat's chat model uses it.

The same Python version gives the same conversations: files are read in sorted order and the
choices come from a seeded random generator.
"""

from __future__ import annotations

import ast
import random
import re

from onecard.calculator import calculate
from onecard.data import Corpus

QUESTIONS = ("What does {name} do?", "What is {name} for?", "Explain {name} in one sentence.",
             "In Python, what does {name} do?")
MAX_ANSWER_CHARS = 160


def _first_sentence(docstring: str) -> str | None:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    if len(sentence) < 12 or len(sentence) > MAX_ANSWER_CHARS or not sentence[0].isalpha():
        return None
    return sentence


def _module_name(relative: str) -> str:
    parts = relative.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def documented_functions(corpus: Corpus) -> list[tuple[str, str]]:
    """(qualified name, first sentence of its docstring) of the public functions of public modules."""
    found = []
    for i, (path, relative) in sorted(enumerate(zip(corpus.files, corpus.names, strict=True)), key=lambda p: p[1][1]):
        if corpus.whole_file_split(i) == "val":
            continue  # held out of pre-training: its bits per byte stays a held-out measure after SFT
        module = _module_name(relative)
        if not module or any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                sentence = _first_sentence(ast.get_docstring(node) or "")
                if sentence:
                    found.append((f"{module}.{node.name}", sentence))
    return found


def _documentation(name: str, sentence: str, rng: random.Random) -> list[dict]:
    question = rng.choice(QUESTIONS).format(name=f"`{name}`")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": f"`{name}`: {sentence}"}]


def _arithmetic(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    expression = f"{a} {op} {b}"
    result = calculate(expression)
    return [{"role": "user", "content": f"What is {a} {op} {b}?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me calculate: "},
                {"type": "python", "text": expression},
                {"type": "python_output", "text": result},
                {"type": "text", "text": f" So {expression} = {result}."}]}]


def conversations(corpus: Corpus, limit: int = 3000, arithmetic_share: float = 0.25, seed: int = 0
                  ) -> list[list[dict]]:
    """Up to `limit` conversations, about a quarter of them arithmetic with the tool."""
    rng = random.Random(seed)
    functions = documented_functions(corpus)
    rng.shuffle(functions)
    n_math = int(limit * arithmetic_share)
    out = [_documentation(name, sentence, rng) for name, sentence in functions[: limit - n_math]]
    out += [_arithmetic(rng) for _ in range(n_math)]
    rng.shuffle(out)
    return out
