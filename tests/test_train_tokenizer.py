"""`onecard train --tokenizer DIR`: a tokenizer trained once by `onecard tokenizer train` becomes the
run's (its vocabulary the model's, a copy in RUN_DIR/tokenizer); what does not fit is refused in one line."""

import json

import pytest

from onecard.cli import main
from onecard.tokenizer import Tokenizer

# TINY of tests/serve_helpers.py without the flags that train a tokenizer
SHAPE = ["--device", "cpu", "--depth", "1", "--seq-len", "32", "--micro-batch", "2", "--total-batch", "128",
         "--eval-every", "0", "--eval-batches", "1"]
TEXT = "def main(argv):\n    return sorted(set(argv), key=len)  # ünïcode too\n"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two 300-token tokenizers from different text (the embedded corpus' first 20,000 and 30,000 characters)."""
    root = tmp_path_factory.mktemp("tokenizers")
    for name, chars in (("tok", "20000"), ("other", "30000")):
        assert main(["tokenizer", "train", "--vocab-size", "300", "--max-chars", chars,
                     "--out", str(root / name)]) == 0
    return root / "tok", root / "other"


def one_line_refusal(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_trained_tokenizer_is_the_runs_and_its_resume_keeps_it(tokenizers, tmp_path, capsys):
    tok, other = tokenizers
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--tokenizer", str(tok), *SHAPE, "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: 300 tokens from" in out and "training a" not in out  # none trained
    given, kept = Tokenizer.load(tok), Tokenizer.load(run / "tokenizer")
    assert kept.encode(TEXT) == given.encode(TEXT) and kept.same_as(given)
    # no --vocab-size: the model's vocabulary is the tokenizer's (the demo model's default is 2,048)
    assert json.loads((run / "config.json").read_text())["model_config"]["vocab_size"] == 300

    # a resume with the same tokenizer, or without the flag, goes on; with another one it is refused
    assert main(["train", "--run-dir", str(run), "--tokenizer", str(tok), *SHAPE, "--steps", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    err = one_line_refusal(capsys, "train", "--run-dir", str(run), "--tokenizer", str(other), *SHAPE, "--steps", "3")
    assert f"--tokenizer {other} is not the tokenizer of the run in {run}" in err
    assert main(["train", "--run-dir", str(run), *SHAPE, "--steps", "3"]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    assert Tokenizer.load(run / "tokenizer").same_as(given)


def test_what_does_not_fit_is_refused_before_anything_is_written(tokenizers, tmp_path, capsys):
    tok, _ = tokenizers
    run = tmp_path / "run"
    err = one_line_refusal(capsys, "train", "--run-dir", str(run), "--tokenizer", str(tok), "--vocab-size", "512",
                           *SHAPE, "--steps", "1")
    assert "has 300 tokens, not --vocab-size 512" in err
    err = one_line_refusal(capsys, "train", "--run-dir", str(run), "--tokenizer", str(tmp_path / "nowhere"),
                           *SHAPE, "--steps", "1")
    assert "--tokenizer: no tokenizer in" in err
    err = one_line_refusal(capsys, "train", "--run-dir", str(run), "--tokenizer", str(tok), "--init-from", str(tok),
                           *SHAPE, "--steps", "1")
    assert "brings the tokenizer its weights were trained with: drop --tokenizer" in err
    err = one_line_refusal(capsys, "train", "--run-dir", str(run), "--tokenizer", str(tok), "--tokenizer-chars",
                           "20000", *SHAPE, "--steps", "1")
    assert "--tokenizer-chars is for training a tokenizer" in err
    assert not run.exists()
