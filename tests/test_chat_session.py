"""`onecard chat` as a person meets it: Ctrl-C at any moment, bytes that are not UTF-8, a line edited
at a terminal, a conversation longer than the context the model trained on."""

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onecard.chat import Chat, talk
from onecard.cli import main
from onecard.engine import Engine, Sampling
from onecard.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32",
        "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


class Terminal(io.StringIO):
    def isatty(self):
        return True


def lines_then(monkeypatch, *answers):
    """input() gives these in turn: a string is a line, an exception is raised."""
    answers = list(answers)

    def fake_input(prompt=""):
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer
    monkeypatch.setattr("builtins.input", fake_input)


def test_help_explains_the_session(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "/clear" in said and "/quit or Ctrl-D leaves" in said and "trained on" in said


def test_bytes_that_are_not_utf8_on_stdin_are_a_message(base, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\n/quit\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)  # as with LANG=en_US.UTF-8: strict decoding
    assert main(["chat", str(base), "--max-tokens", "2", "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert said.out.endswith("\n") and "Traceback" not in said.err  # the message's reply


def test_piped_in_the_replies_alone_go_to_stdout(base, monkeypatch, capsys):
    """`onecard chat RUN < questions.txt > answers.txt`: a reply a line, no prompts or banner among them, nor
    what a command did (it went to stdout: '(temperature 0)' was the answers' first line)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("/temperature 0\nhello\n\n/clear\n/topk x\nhow are you\n"
                                                  + "word " * 1000 + "\n"))
    assert main(["chat", str(base), "--max-tokens", "3", "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert said.out.endswith("\n") and "you> " not in said.out and "model> " not in said.out
    assert "(" not in said.out and said.out.count("\n") == 2  # the two replies alone
    assert "chatting with" in said.err and "(temperature 0)" in said.err and "(new conversation)" in said.err
    assert "(/topk:" in said.err and "outgrown the model's context" in said.err


def test_a_closed_stdout_is_one_line(base, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", None)  # `onecard chat RUN -p hi >&-`
    code = main(["chat", str(base), "-p", "hi", "--max-tokens", "2", "--device", "cpu"])
    monkeypatch.undo()
    assert code == 2 and "standard output is closed" in capsys.readouterr().err


def test_ctrl_c_before_the_first_token_keeps_the_chat(base, monkeypatch, capsys):
    model, tokenizer, _ = load_weights(base)
    chat = Chat(Engine(model, tokenizer), tokenizer, Sampling(max_tokens=2), None)
    calls = []

    def slow_prompt(*args):  # Ctrl-C while the message is read into tokens (the first reply imports, too)
        calls.append(args)
        raise KeyboardInterrupt
    monkeypatch.setattr("onecard.conversations.prompt_ids", slow_prompt)
    lines_then(monkeypatch, "hello", "/quit")
    try:
        assert talk(chat, Terminal()) == 0
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C before the reply's first token ended the chat")
    assert calls and chat.messages == [] and "[stopped]" in capsys.readouterr().out


def test_ctrl_c_at_the_prompt_drops_the_line_at_a_terminal_and_ends_a_pipe(base, monkeypatch, capsys):
    model, tokenizer, _ = load_weights(base)
    chat = Chat(Engine(model, tokenizer), tokenizer, Sampling(max_tokens=2), None)
    chat.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines_then(monkeypatch, KeyboardInterrupt(), "/quit")
    assert talk(chat, Terminal()) == 0
    assert "(Ctrl-D or /quit leaves)" in capsys.readouterr().out and len(chat.messages) == 2
    lines_then(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # piped in, Ctrl-C is the way to stop the command
        talk(chat, io.StringIO())


class FullEngine:
    """Writes until the context is full, as the engine does when the model does not stop."""

    def __init__(self, model):
        self.model = model

    def complete(self, prompt, sampling, on_text):
        on_text(0, "x")
        return [[0] * min(sampling.max_tokens, self.model.rotary_len - len(prompt))]


class InterruptedEngine(FullEngine):
    """Ctrl-C in the middle of each reply."""

    def complete(self, prompt, sampling, on_text):
        on_text(0, "x")
        raise KeyboardInterrupt


def test_ctrl_c_in_a_reply_stops_the_reply_at_a_terminal_and_ends_a_pipe(base, monkeypatch, capsys):
    """Piped in (`onecard chat RUN < questions.txt`), Ctrl-C stopped the reply under way and the chat went on
    with the next message, to exit 0: it took one Ctrl-C per message to stop the command."""
    model, tokenizer, _ = load_weights(base)
    chat = Chat(InterruptedEngine(model), tokenizer, Sampling(max_tokens=2), None)
    lines_then(monkeypatch, "hello", "again", "/quit")
    assert talk(chat, Terminal()) == 0
    assert capsys.readouterr().out.count("x [stopped]\n") == 2 and len(chat.messages) == 4
    chat = Chat(InterruptedEngine(model), tokenizer, Sampling(max_tokens=2), None)
    lines_then(monkeypatch, "hello", "again", "/quit")
    with pytest.raises(KeyboardInterrupt):
        talk(chat, io.StringIO())
    assert capsys.readouterr().out == "x [stopped]\n" and chat.messages == []
    monkeypatch.setattr("onecard.engine.Engine.complete", InterruptedEngine.complete)
    assert main(["chat", str(base), "-p", "hi", "--device", "cpu"]) == 130  # a script sees it did not finish
    assert "interrupted" in capsys.readouterr().err


def test_past_the_trained_context_it_says_so_once_and_marks_a_reply_cut_at_the_context(base, capsys):
    from onecard.conversations import prompt_ids

    model, tokenizer, _ = load_weights(base)
    chat = Chat(Engine(model, tokenizer), tokenizer, Sampling(max_tokens=4), None, out=io.StringIO())
    chat.reply("word " * model.config.sequence_len)
    chat.reply("again")
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and f"past the {model.config.sequence_len} the model trained on" in err
    out = io.StringIO()
    chat = Chat(FullEngine(model), tokenizer, Sampling(max_tokens=model.rotary_len), None, out=out)
    text = "word "
    while len(prompt_ids(tokenizer, [{"role": "user", "content": text + "word "}])) < model.rotary_len - 4:
        text += "word "
    chat.reply(text)
    assert out.getvalue() == "x [cut: the model's context is full]\n"
    chat.sampling.max_tokens = 2  # a reply that ends at max_tokens is not cut by the context
    chat.command("/clear")
    chat.reply("hi")
    assert out.getvalue().endswith("(new conversation)\nx\n")


def read_until(fd: int, text: bytes, seen: bytearray, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while text not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                return


def test_a_line_is_edited_at_a_terminal(base):
    """Typed `quit`, Ctrl-A (to the line's start), `/`: the line is `/quit` (without line editing it was a
    message holding a control character and escape codes)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "onecard", "chat", str(base), "--max-tokens", "2"],
                               stdin=follower, stdout=follower, stderr=follower, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"})
    os.close(follower)
    seen = bytearray()
    try:
        read_until(leader, b"you> ", seen)
        os.write(leader, b"quit\x01/\r")
        assert process.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        process.kill()
        os.close(leader)


def test_each_reply_draws_from_its_own_seed_and_the_same_chat_repeats(base):
    """Every reply restarted the draws from --seed: at a high temperature two different questions began alike."""
    model, tokenizer, _ = load_weights(base)
    seeds = []

    class Recording(Engine):
        def complete(self, prompt, sampling, on_text=None):
            seeds.append(sampling.seed)
            return super().complete(prompt, sampling, on_text=on_text)

    def conversation() -> list[str]:
        chat = Chat(Recording(model, tokenizer), tokenizer, Sampling(temperature=2.0, max_tokens=6, seed=7), None,
                    out=io.StringIO())
        return [chat.reply(text) for text in ("hello", "hello", "hello")]

    first = conversation()
    assert seeds == [7, 8, 9]
    assert conversation() == first  # the same --seed and messages give the same replies
