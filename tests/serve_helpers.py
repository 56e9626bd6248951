"""Shared by the tests of `onecard serve`: a tiny run made in a second, servers on free local
ports, and a scripted engine that writes a chosen text slowly (to watch streaming and stopping)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from onecard.cli import main
from onecard.engine import Engine

TINY = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32",
        "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1", "--steps", "2"]


def make_runs(root: Path) -> tuple[Path, Path]:
    """(a base run, the same weights marked as a chat model): serving does not care how well it learned."""
    base = root / "base"
    assert main(["train", "--run-dir", str(base), *TINY]) == 0
    chat = root / "chat"
    chat.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(base / name, chat / name)
    shutil.copytree(base / "tokenizer", chat / "tokenizer")
    config = json.loads((chat / "config.json").read_text())
    config["stage"] = "sft"
    (chat / "config.json").write_text(json.dumps(config))
    return base, chat


class Record:
    """What a scripted engine did: steps taken, and whether its generation was closed early."""

    def __init__(self) -> None:
        self.steps = 0
        self.closed = threading.Event()
        self.finished = threading.Event()


class ScriptedEngine(Engine):
    """Writes `text` one token per step, `delay` seconds a step, then <|assistant_end|>."""

    def __init__(self, tokenizer, text: str, delay: float = 0.0, record: Record | None = None,
                 fail: bool = False) -> None:
        super().__init__(None, tokenizer, tools=False)
        self.text, self.delay, self.record, self.fail = text, delay, record or Record(), fail

    def generate(self, prompt, sampling, num_samples=1):
        if self.fail:
            raise RuntimeError("scripted failure")
        end = self.tokenizer.special_id("<|assistant_end|>")
        try:
            for token in [*self.tokenizer.encode(self.text), end]:
                time.sleep(self.delay)
                self.record.steps += 1
                if token == end:  # the whole text is out (the caller closes us at the end token)
                    self.record.finished.set()
                yield [(token, False)] * num_samples
        finally:
            self.record.closed.set()


def scripted_backend(tokenizer, text: str, delay: float = 0.0, record: Record | None = None, workers: int = 2,
                     max_queued: int = 8, fail: bool = False, kind: str = "chat"):
    from onecard.server import Backend

    backend = Backend("scripted", workers=workers, max_queued=max_queued)
    backend.ready(lambda tools: ScriptedEngine(tokenizer, text, delay, record, fail), tokenizer, 10_000, kind)
    return backend


def model_backend(run_dir: Path, kind: str, workers: int = 2, max_queued: int = 8):
    from onecard.server import Backend
    from onecard.weights import load_weights

    model, tokenizer, _ = load_weights(run_dir)
    backend = Backend(run_dir.name, workers=workers, max_queued=max_queued)
    backend.load(lambda: (model, tokenizer, kind))
    assert backend.status == "ready", backend.error
    return backend


class CutStreams:
    """ASGI middleware: every streamed answer of /v1/ ends after `pieces` pieces of its body, without
    its `data: [DONE]`: cleanly (a proxy that cut it off), or `broken` (a server killed mid-reply)."""

    def __init__(self, app, pieces: int, broken: bool = False) -> None:
        self.app, self.pieces, self.broken = app, pieces, broken

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        sent = 0

        async def cut(message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and message.get("more_body"):
                sent += 1
                if sent == self.pieces + 1:
                    if self.broken:
                        raise ConnectionAbortedError("the stream was cut (a test of the client)")
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                elif sent > self.pieces:
                    return
            await send(message)
        await self.app(scope, receive, cut)
