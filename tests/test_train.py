"""Bits per byte by hand, a short real training run on the embedded corpus, and its log's schema."""

import json
import math
import re

import pytest
import torch

import onecard.loop
from onecard.data import Corpus
from onecard.engine import evaluate_bpb
from onecard.errors import UsageError
from onecard.model import GPTConfig
from onecard.pretrain import grad_accum_steps, train
from onecard.recipe import Recipe
from onecard.run import TrainSettings
from onecard.tokenizer import Tokenizer
from onecard.weights import load_weights


class FixedLoss(torch.nn.Module):
    """Per-position loss = 1 + target/10, so every term of the sum is known by hand."""

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return (1.0 + targets.float() / 10).view(-1)


def test_bits_per_byte_hand_computed():
    token_bytes = torch.tensor([0, 1, 1, 1, 1, 3, 1, 2])  # id 0 is a special token (0 bytes)
    batches = [(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[5, 0, 7, -1]]))]
    # counted: target 5 (loss 1.5, 3 bytes) and target 7 (loss 1.7, 2 bytes); the special token and
    # the ignored -1 count neither loss nor bytes: 3.2 nats over 5 bytes.
    expected = 3.2 / (math.log(2) * 5)
    # the losses are fp32
    assert evaluate_bpb(FixedLoss(), batches, token_bytes, "cpu") == pytest.approx(expected, rel=1e-6)


def test_total_batch_must_be_whole_micro_batches():
    assert grad_accum_steps(4096, 8, 128) == 4
    with pytest.raises(UsageError, match="use 4096 or 5120"):
        grad_accum_steps(4100, 8, 128)
    # 64 tokens of 32 on 2 ranks: one sequence a rank. A new run may change its total batch; a resumed one
    # cannot (the advice used to say --total-batch 128, which the resume then refused)
    with pytest.raises(UsageError, match=r"use 128 or 256, or --micro-batch 1$"):
        grad_accum_steps(64, 2, 32, ranks=2)
    with pytest.raises(UsageError, match=r"keeps its total batch: resume with --micro-batch 1$"):
        grad_accum_steps(64, 2, 32, ranks=2, resumed=True)
    with pytest.raises(UsageError, match="3 ranks cannot share evenly: resume with other ranks"):
        grad_accum_steps(64, 2, 32, ranks=3, resumed=True)
    assert grad_accum_steps(64, 1, 32, ranks=2, resumed=True) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    corpus = Corpus.embedded()
    from onecard.data import iter_texts
    tokenizer = Tokenizer.train(iter_texts(corpus, 400_000), 512)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    run_dir = tmp_path_factory.mktemp("run")
    settings = TrainSettings(run_dir=run_dir, steps=40, total_batch=1024, seed=3, eval_every=0, eval_batches=4,
                             sample_tokens=8)
    result = train(config, tokenizer, corpus, Recipe(micro_batch=8, seq_len=64), settings, log=lambda *_: None)
    return result


def test_short_cpu_run_lowers_validation_bpb(tiny_run):
    # 40 steps of 1024 tokens: validation bits per byte must fall by at least 25 % from the start.
    start, end = tiny_run["val_bpb_start"], tiny_run["val_bpb_end"]
    assert end < 0.75 * start, (start, end)


def test_run_directory_reloads_to_the_same_model(tiny_run):
    run_dir = tiny_run["run_dir"]
    assert (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists()
    model, tokenizer, info = load_weights(run_dir)
    assert info["layout"] == "onecard"
    idx = torch.randint(0, tokenizer.vocab_size, (1, 16))
    trained = tiny_run["model"].eval()
    torch.testing.assert_close(model(idx), trained(idx))


# The documented schema of a log.jsonl step line (train.py's docstring): field -> allowed types.
NUMBER, NULL = (int, float), type(None)
STEP_FIELDS = {
    "step": int, "loss": (float, NULL), "grad_norm": (float, NULL), "lr_multiplier": NUMBER, "skipped": bool,
    "step_time_s": float, "tokens": int, "tokens_per_s": (float, NULL), "mfu": (float, NULL),
    "vram_bytes": (int, NULL), "vram_peak_bytes": (int, NULL), "host_peak_bytes": int,
    "power_w": (float, NULL), "energy_kwh": (float, NULL), "energy_estimated": bool, "cost": (float, NULL),
    "wall_s": float, "eta_s": (float, NULL), "time": float,
}
EVENTS = {"start", "resume", "checkpoint", "checkpoint_failed", "compiled", "compile_failed", "stop", "end"}


def test_log_lines_follow_the_documented_schema(tiny_run):
    lines = [json.loads(line) for line in (tiny_run["run_dir"] / "log.jsonl").read_text().splitlines()]
    assert lines[0].keys() == {"step", "val_bpb", "time"} and lines[0]["step"] == 0
    steps = [r for r in lines[1:] if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for record in steps:
        extra = {"val_bpb"} if record["step"] == 40 else set()  # eval_every=0: only at the end
        assert record.keys() == STEP_FIELDS.keys() | extra, record["step"]
        for key, types in STEP_FIELDS.items():
            assert isinstance(record[key], types), (key, record[key])
    # on the CPU nothing that needs a GPU is reported, and nothing is invented
    assert all(r["mfu"] is None and r["vram_bytes"] is None and r["power_w"] is None and r["energy_kwh"] is None
               for r in steps)
    assert [r["tokens"] for r in steps[:2]] == [1024, 2048] and steps[-1]["eta_s"] == 0
    events = [r for r in lines if "event" in r]
    assert {e["event"] for e in events} <= EVENTS and [e["event"] for e in events] == ["start", "checkpoint", "end"]
    for key in [*STEP_FIELDS, "val_bpb"]:  # every field is documented
        assert re.search(rf"^  {key} ", onecard.loop.__doc__, re.M), key
    for kind in EVENTS:
        assert kind in onecard.loop.__doc__, kind


def test_summary_and_final_checkpoint(tiny_run):
    run_dir = tiny_run["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == summary["steps"] == 40
    assert summary["val_bpb_end"] == tiny_run["val_bpb_end"] and summary["tokens"] == 40 * 1024
    assert summary["energy_kwh"] is None and summary["energy_sources"] == [] and summary["cost"] is None
    assert summary["last_checkpoint"] == "checkpoints/step_000040"
    assert (run_dir / "latest").read_text().strip() == "checkpoints/step_000040"


def test_a_relative_data_path_still_finds_the_corpus_from_another_folder(tmp_path, monkeypatch):
    """The run records --data as an absolute path: a resume started elsewhere reads the same text."""
    from onecard.cli import main
    from tests.serve_helpers import TINY

    corpus = tmp_path / "work" / "small"
    corpus.mkdir(parents=True)
    for i in range(3):
        words = " ".join(f"{w}{i}{j}" for j in range(300) for w in ("alpha", "beta", "gamma"))
        (corpus / f"{i}.txt").write_text(words, encoding="utf-8")
    monkeypatch.chdir(tmp_path / "work")
    run = tmp_path / "run"
    tiny = TINY[:-2]  # all but its --steps 2
    assert main(["train", "--run-dir", str(run), "--data", "small", *tiny, "--steps", "1"]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert str(corpus.resolve()) in json.dumps(recorded)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--run-dir", str(run), "--steps", "2", "--device", "cpu"]) == 0


def test_the_embedded_chat_set_leaves_out_pre_trainings_validation_files():
    from onecard.embedded_chat import _module_name, documented_functions

    corpus = Corpus.embedded()
    held = {_module_name(corpus.names[i]) for i in corpus._txt_val} - {""}
    found = {name.rsplit(".", 1)[0] for name, _ in documented_functions(corpus)}
    assert held and found and not held & found


def test_a_full_disk_under_the_log_stops_in_one_line_that_says_where_to_resume(tmp_path, monkeypatch, capsys):
    """The log file is written every step: when the disk fills, the run stops with the error, the step,
    and the last complete checkpoint, exit 2, and no traceback; resuming goes on from that checkpoint."""
    import errno
    import pathlib

    from onecard.cli import main
    from tests.serve_helpers import TINY

    run = tmp_path / "run"
    real_open = pathlib.Path.open

    class FillsUp:
        def __init__(self, file):
            self.file, self.lines = file, 0

        def write(self, text):
            self.lines += 1
            if self.lines > 4:  # the resume event, step 3, its checkpoint event and step 4 fit
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    def open_(path, mode="r", *args, **kwargs):
        opened = real_open(path, mode, *args, **kwargs)
        return FillsUp(opened) if path.name == "log.jsonl" and mode == "a" else opened

    tiny = TINY[:-2]
    assert main(["train", "--run-dir", str(run), *tiny, "--steps", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(pathlib.Path, "open", open_)
    assert main(["train", "--run-dir", str(run), *tiny, "--steps", "6", "--save-every-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [error] = [line for line in err.splitlines() if line.startswith("onecard: error:")]
    # step 4's checkpoint was written; the line saying so in the log was not
    assert "No space left on device: stopped at step 4; the last complete checkpoint, step 4, is intact" in error
    assert (run / "latest").read_text().strip() == "checkpoints/step_000004"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["message"]
    monkeypatch.setattr(pathlib.Path, "open", real_open)
    assert main(["train", "--run-dir", str(run), *tiny, "--steps", "6"]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 6
