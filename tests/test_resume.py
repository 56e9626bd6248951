"""A run that is stopped, crashes or meets bad numbers goes on exactly where it was."""

import json
import os
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

from onecard import checkpoint
from onecard.data import Corpus, iter_texts
from onecard.errors import UsageError
from onecard.model import GPTConfig, build_model
from onecard.pretrain import train
from onecard.recipe import NAMED
from onecard.run import TrainSettings
from onecard.tokenizer import Tokenizer

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    corpus = Corpus.embedded()
    tokenizer = Tokenizer.train(iter_texts(corpus, 100_000), 300)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    return corpus, tokenizer, config


def run(setup, run_dir, recipe="baseline", model=None, messages=None, micro_batch=4, **changes):
    corpus, tokenizer, config = setup
    settings = TrainSettings(run_dir=run_dir, steps=STEPS, total_batch=256, seed=5, eval_every=0, eval_batches=1,
                             sample_tokens=2)
    for key, value in changes.items():
        setattr(settings, key, value)
    log = (lambda *_: None) if messages is None else messages.append
    return train(config, tokenizer, corpus, NAMED[recipe].with_(micro_batch=micro_batch, seq_len=32), settings,
                 model=model, log=log)


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def on_training_forward(setup, calls, action):
    """A model that runs `action(n)` before its n-th training forward (1-based; evaluation not counted),
    initialized as train() would."""
    torch.manual_seed(5)
    model = build_model(setup[2])
    count = [0]

    def hook(module, args):
        if module.training:
            count[0] += 1
            if count[0] in calls:
                return action(count[0], args)
    model.register_forward_pre_hook(hook)
    return model


# bf16: bf16 weights written back with stochastic rounding (torch RNG) and bf16 optimizer states;
# lean: the same with 8-bit states; both need every RNG and state restored to match bitwise.
@pytest.mark.parametrize("recipe", ["baseline", "bf16", "lean"])
def test_stopped_and_resumed_equals_uninterrupted(setup, tmp_path, recipe):
    straight = run(setup, tmp_path / "straight", recipe)
    first = run(setup, tmp_path / "resumed", recipe, stop_after=2)
    assert first["stopped"] == "limit" and first["step"] == 2
    messages = []
    second = run(setup, tmp_path / "resumed", recipe, messages=messages)
    assert second["stopped"] is None and any("resuming from step 2" in m for m in messages)
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert second["val_bpb_end"] == straight["val_bpb_end"]
    # one line per step in the log, though two sessions wrote it
    steps = [r["step"] for r in map(json.loads, (tmp_path / "resumed" / "log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_signal_mid_step_abandons_it_and_resume_redoes_it(setup, tmp_path):
    straight = weights(run(setup, tmp_path / "straight")["run_dir"])
    # 256 tokens a step = 2 micro-batches: SIGINT during the first micro-batch of step 4
    model = on_training_forward(setup, {7}, lambda n, args: os.kill(os.getpid(), signal.SIGINT))
    messages = []
    handler = signal.getsignal(signal.SIGINT)
    first = run(setup, tmp_path / "resumed", model=model, messages=messages)
    assert first["stopped"] == "signal" and first["step"] == 3 and first["last_checkpoint"] == 3
    assert any("step 4 abandoned" in m for m in messages)
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    run(setup, tmp_path / "resumed")
    assert_bitwise_equal(straight, weights(tmp_path / "resumed"))


def test_second_sigint_during_a_save_quits_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    # the first Ctrl-C in step 4's last micro-batch: the step ends, then the stop's checkpoint
    model = on_training_forward(setup, {8}, lambda n, args: os.kill(os.getpid(), signal.SIGINT))
    real_save = torch.save

    def save_then_sigint(obj, path):  # the second Ctrl-C lands while the checkpoint is written
        real_save(obj, path)
        if "step_000004" in str(path):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path, model=model, save_every_steps=2)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert checkpoint.find_latest(tmp_path).step == 2
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert run(setup, tmp_path)["step"] == STEPS


def test_a_run_reads_running_until_its_final_weights_and_a_stop_before_them_is_finished_on_resume(
        setup, tmp_path, monkeypatch):
    """The final checkpoint is written inside the loop; the sample and model.safetensors after it.
    A run stopped between the two used to read "finished" and could not be finished ("at step 6 of
    6"): it reads "running" (then "interrupted") and the same command writes its final weights."""
    from onecard import session

    seen = []

    def ctrl_c_while_sampling(*_args, **_kwargs):
        seen.append(json.loads((tmp_path / "summary.json").read_text())["status"])
        raise KeyboardInterrupt

    def save_seeing_the_summary(*args, **kwargs):  # the summary the session's start or last checkpoint wrote
        seen.append(json.loads((tmp_path / "summary.json").read_text())["status"])
        return real_save(*args, **kwargs)

    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", save_seeing_the_summary)
    monkeypatch.setattr(session, "sample_text", ctrl_c_while_sampling)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path, save_every_steps=2)
    assert seen == ["running"] * 4  # at steps 2, 4 and 6 (the start wrote the first), then while sampling
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "final weights" in summary["message"]
    assert checkpoint.find_latest(tmp_path).step == STEPS and not (tmp_path / "model.safetensors").exists()
    monkeypatch.undo()
    messages = []
    result = run(setup, tmp_path, messages=messages)
    assert result["step"] == STEPS and result["stopped"] is None and result["sample"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    straight = tmp_path / "straight"
    run(setup, straight)
    assert_bitwise_equal(weights(straight), weights(tmp_path))
    with pytest.raises(UsageError, match=f"at step {STEPS} of {STEPS}"):  # now finished: nothing to do
        run(setup, tmp_path)


def test_a_resume_with_another_micro_batch_scores_the_same_validation_rows(setup, tmp_path):
    """The validation set is eval_batches x the run's first micro-batch, kept on resume: it used to
    be eval_batches x the current one, so halving the micro-batch (as the out-of-memory advice says)
    halved the text scored and moved validation bits per byte by tenths."""
    straight = run(setup, tmp_path / "straight", eval_batches=2)
    run(setup, tmp_path / "halved", eval_batches=2, stop_after=3)
    halved = run(setup, tmp_path / "halved", eval_batches=2, micro_batch=2)
    assert halved["val_bpb_start"] == straight["val_bpb_start"]
    # the same rows; the weights differ only by the order of the gradients' sums
    assert halved["val_bpb_end"] == pytest.approx(straight["val_bpb_end"], rel=1e-4)
    config = json.loads((tmp_path / "halved" / "config.json").read_text())
    assert config["train"]["eval_rows"] == 8 and config["recipe"]["micro_batch"] == 2


def test_first_rows_are_the_same_whatever_the_batch_size(setup):
    from onecard.engine import first_rows
    from onecard.loader import TokenLoader

    corpus, tokenizer, _ = setup
    rows = {b: torch.cat([x for x, _ in first_rows(TokenLoader(corpus, tokenizer, b, 32, split="val"), 7)])
            for b in (1, 2, 3, 7, 8)}
    assert all(r.shape == (7, 32) and torch.equal(r, rows[1]) for r in rows.values())


def test_conflicting_config_is_refused_unless_force_new(setup, tmp_path):
    corpus, tokenizer, config = setup
    run(setup, tmp_path, stop_after=1)
    deeper = GPTConfig(**{**config.to_dict(), "n_layer": 3})
    settings = TrainSettings(run_dir=tmp_path, steps=STEPS, total_batch=256, seed=5, eval_every=0, eval_batches=1)
    recipe = NAMED["baseline"].with_(micro_batch=4, seq_len=32)
    with pytest.raises(UsageError, match="n_layer 2 -> 3.*--force-new"):
        train(deeper, tokenizer, corpus, recipe, settings, log=lambda *_: None)
    with pytest.raises(UsageError, match="seed 5 -> 6"):
        run(setup, tmp_path, seed=6)
    settings.force_new = True
    settings.steps = 1
    result = train(deeper, tokenizer, corpus, recipe, settings, log=lambda *_: None)
    assert result["step"] == 1
    aside = list(tmp_path.glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_000001").is_dir()  # nothing deleted


def test_a_finished_run_asks_for_more_steps(setup, tmp_path):
    run(setup, tmp_path)
    with pytest.raises(UsageError, match="at step 6 of 6: give --steps"):
        run(setup, tmp_path)
    assert run(setup, tmp_path, steps=STEPS + 1)["step"] == STEPS + 1


def test_non_finite_loss_skips_the_step(setup, tmp_path):
    model = build_model(setup[2])
    count = [0]

    def poison(module, inputs, out):  # step 3 = training forwards 5 and 6 (two micro-batches a step)
        if module.training:
            count[0] += 1
            if count[0] in (5, 6):
                return out * float("nan")
    model.transformer.wte.register_forward_hook(poison)
    result = run(setup, tmp_path, model=model)
    assert result["stopped"] is None and result["summary"]["skipped_steps"] == 1
    third = result["history"][2]
    assert third["skipped"] and third["loss"] is None and third["grad_norm"] is None
    assert not any(r["skipped"] for r in result["history"][3:])
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())


def test_non_finite_in_a_row_stops_with_a_checkpoint(setup, tmp_path):
    model = build_model(setup[2])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.transformer.wte.register_forward_hook(lambda m, i, out: out * float("inf") if m.training else out)
    result = run(setup, tmp_path, model=model, max_bad_steps=3)
    assert result["stopped"] == "nonfinite" and result["step"] == 3 and result["last_checkpoint"] == 3
    assert "3 steps in a row" in result["message"]
    found = checkpoint.find_latest(tmp_path)
    state = load_file(str(found.path / "model.safetensors"))
    assert_bitwise_equal(initial, state)  # nothing was applied


def test_out_of_memory_says_what_to_try_and_keeps_the_work(setup, tmp_path):
    def oom(n, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = on_training_forward(setup, {7}, oom)  # step 4
    with pytest.raises(UsageError) as error:
        run(setup, tmp_path, model=model)
    text = str(error.value)
    assert "ran out of memory" in text and "--recipe recompute" in text and "--micro-batch 2" in text
    assert "planner's prediction" in text and "step 3 is saved" in text
    assert checkpoint.find_latest(tmp_path).step == 3
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_out_of_memory_in_the_update_saves_nothing_half_updated(setup, tmp_path, monkeypatch):
    """Out of memory inside the optimizer's update leaves some parameters updated and others not:
    those weights are not saved; the run resumes from its last checkpoint as if nothing happened."""
    from onecard.optim import Optimizers

    real_step, calls = Optimizers.step, [0]

    def update_cut_short(self):
        calls[0] += 1
        if calls[0] == 4:
            next(iter(self.params())).data.add_(1.0)  # a part of the update was applied
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_step(self)

    straight = run(setup, tmp_path / "straight", save_every_steps=2, eval_every=2)
    monkeypatch.setattr(Optimizers, "step", update_cut_short)
    with pytest.raises(UsageError, match="ran out of memory.*step 2 is saved"):
        run(setup, tmp_path / "cut", save_every_steps=2, eval_every=2)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path / "cut")] == [2]  # not step 3's, whole as it was
    monkeypatch.undo()
    run(setup, tmp_path / "cut", save_every_steps=2, eval_every=2)
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(tmp_path / "cut"))
    assert straight["step"] == STEPS


def test_out_of_memory_in_an_evaluation_saves_the_step_then_says_what_to_try(setup, tmp_path, monkeypatch):
    from onecard import engine

    real_bpb, calls = engine.evaluate_bpb, [0]

    def evaluation_out_of_memory(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # step 0, step 2, then step 4's
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_bpb(*args, **kwargs)

    run(setup, tmp_path / "straight", eval_every=2)
    monkeypatch.setattr(engine, "evaluate_bpb", evaluation_out_of_memory)
    with pytest.raises(UsageError, match="ran out of memory.*step 4 is saved"):
        run(setup, tmp_path / "cut", eval_every=2)
    assert checkpoint.find_latest(tmp_path / "cut").step == 4
    monkeypatch.undo()
    run(setup, tmp_path / "cut", eval_every=2)
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(tmp_path / "cut"))


def test_full_disk_during_training_keeps_the_previous_checkpoint_and_goes_on(setup, tmp_path, monkeypatch):
    """Training goes on past a failed save; a run whose last checkpoint failed ends as failed (exit 1)."""
    Usage = namedtuple("Usage", "total used free")
    real = checkpoint.shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda p: real(p) if not checkpoint.step_dirs(tmp_path) else Usage(1, 1, 1000))
    messages = []
    result = run(setup, tmp_path, save_every_steps=2, messages=messages)
    assert result["stopped"] == "failed" and result["last_checkpoint"] == 2 and result["step"] == 6
    assert "last checkpoint could not be written" in result["message"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    failed = [m for m in messages if "not enough disk space" in m]
    assert len(failed) == 2 and "step 2, is intact" in failed[0]  # at step 4 and at the end
    # the end's save is the last: nothing goes on after it
    assert "Training goes on" in failed[0] and "Training goes on" not in failed[1]
    assert (tmp_path / "model.safetensors").exists()
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "checkpoint_failed"] == [4, 6]
    monkeypatch.undo()
    assert checkpoint.find_latest(tmp_path).step == 2


def test_sigterm_to_the_command_line_then_resume(tmp_path, sigterm_once_training):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "onecard.cli", "train", "--run-dir", str(run_dir), "--device", "cpu",
            "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "16",
            "--micro-batch", "2", "--total-batch", "32", "--eval-every", "0", "--eval-batches", "1"]
    stopped = sigterm_once_training(argv + ["--steps", "1000000"], run_dir, timeout=60)
    out = stopped.stdout
    assert stopped.returncode == 0, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("stopped at step") and f"resume with: onecard train --run-dir {run_dir}" in last
    step = checkpoint.find_latest(run_dir).step
    assert f"checkpoint of step {step} saved" in last

    resumed = subprocess.run(argv + ["--steps", str(step + 2)], capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} of {step + 2}" in resumed.stdout
    assert "training a" not in resumed.stdout  # the tokenizer comes from the run directory
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_a_later_save_that_succeeds_clears_a_failed_one(setup, tmp_path, monkeypatch):
    """The disk is full only while step 4 is saved: the end's checkpoint succeeds and the run finishes."""
    import onecard.loop

    real = checkpoint.save

    def save(run_dir, step, *args, **kwargs):
        if step == 4:
            raise checkpoint.CheckpointError("not enough disk space for the checkpoint")
        return real(run_dir, step, *args, **kwargs)
    monkeypatch.setattr(onecard.loop.checkpoint, "save", save)
    messages = []
    result = run(setup, tmp_path, save_every_steps=4, messages=messages)
    assert any("not enough disk space" in m for m in messages)
    assert result["stopped"] is None and result["last_checkpoint"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"


def test_the_resume_hint_keeps_the_ranks_and_threads():
    """A CPU run's sums depend on the thread count: resuming bitwise needs the same --threads."""
    from pathlib import Path

    from onecard.run import resume_command

    assert resume_command("train", Path("runs/a"), 1, None) == "onecard train --run-dir runs/a"
    assert resume_command("train", Path("runs/a"), 1, 1) == "onecard train --run-dir runs/a --threads 1"
    assert resume_command("train", Path("runs/a"), 2, None) == \
        "torchrun --standalone --nproc_per_node 2 -m onecard.cli train --run-dir runs/a"
    assert resume_command("train", Path("my runs/a"), 1, None, "cpu") == \
        "onecard train --run-dir 'my runs/a' --device cpu"


def test_a_run_stopped_before_its_first_checkpoint_is_started_over_with_its_files_kept(tmp_path, capsys):
    """Killed before its first checkpoint, a run has nothing to resume: the same command starts it
    over, says so, and keeps the earlier session's log (it used to be overwritten without a word)."""
    import shutil

    from onecard.cli import main
    from tests.serve_helpers import TINY

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY]) == 0
    shutil.rmtree(run / "checkpoints")  # as if killed before the first save
    (run / "latest").unlink(missing_ok=True)
    (run / "model.safetensors").unlink()  # (a finished run without checkpoints is refused: nothing to go on from)
    (run / "notes.txt").write_text("the user's own")  # not the run's: stays where it is
    earlier_log = (run / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "holds a run stopped before its first checkpoint: starting it over" in out
    [aside] = run.glob("previous-*")
    assert (aside / "log.jsonl").read_text() == earlier_log
    assert (run / "notes.txt").is_file() and not (aside / "notes.txt").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_finished_run_whose_checkpoints_were_deleted_is_refused_not_redone(tmp_path, capsys):
    import shutil

    from onecard.cli import main
    from tests.serve_helpers import TINY

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY]) == 0
    shutil.rmtree(run / "checkpoints")
    (run / "latest").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), *TINY[:-2], "--steps", "3"]) == 2
    out, err = capsys.readouterr()
    assert "holds a finished run without a checkpoint to continue from" in err
    assert "training a" not in out  # refused before a tokenizer is trained for nothing
    assert not list(run.glob("previous-*")) and (run / "model.safetensors").is_file()


def test_a_resumed_demo_is_still_called_the_demo_and_plans_no_shards(tmp_path, capsys):
    """The demo's shape (4 layers of width 128) is not d4 (width 256): a resume used to head itself
    "d4", and its dry run planned FineWeb-EDU shards for a run on the embedded corpus."""
    from onecard.cli import main

    run = tmp_path / "run"
    tiny_demo = ["--device", "cpu", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32",
                 "--micro-batch", "2", "--total-batch", "64", "--eval-every", "0", "--eval-batches", "1"]
    assert main(["train", "--run-dir", str(run), *tiny_demo, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--steps", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo model: "), out
    assert "data:" not in out and "shard" not in out
    assert main(["sft", "--from", str(run), "--run-dir", str(tmp_path / "sft"), "--device", "cpu", "--dry-run"]) == 0
    assert "(demo model, context 32)" in capsys.readouterr().out  # and SFT's heading: not "d4"


def test_a_run_without_a_checkpoint_is_not_told_to_resume_with_its_run_dir_alone(tmp_path, capsys, monkeypatch):
    """`onecard train --run-dir DIR` alone starts the default run (the demo) in a directory without a
    checkpoint: after a run whose every save failed, that line is not the way to go on."""
    import onecard.loop
    from onecard import session
    from onecard.cli import main
    from tests.serve_helpers import TINY

    def full_disk(*args, **kwargs):
        raise checkpoint.CheckpointError("not enough disk space for the checkpoint")

    def final_weights_fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onecard.loop.checkpoint, "save", full_disk)
    monkeypatch.setattr(session, "save_final", final_weights_fail)
    assert main(["train", "--run-dir", str(tmp_path / "a"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "(resume: onecard" not in err and "the command that started the run starts it over" in err
    monkeypatch.undo()
    monkeypatch.setattr(onecard.loop.checkpoint, "save", full_disk)  # the final weights are written this time
    assert main(["train", "--run-dir", str(tmp_path / "b"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "(resume: onecard" not in err and f"the final weights are written in {tmp_path / 'b'}/" in err


def test_a_disk_full_for_the_final_weights_and_the_summary_says_what_was_kept(tmp_path, capsys, monkeypatch):
    """The disk fills after the last checkpoint: the final weights fail, then the summary that says so.
    That summary's OSError ended the command as a bare `[Errno 28]` (exit 2), without the failure it
    recorded or the line that resumes; the closing words say both (exit 1), and the same command finishes."""
    import onecard.loop
    from onecard import session
    from onecard.cli import main
    from tests.serve_helpers import TINY

    real_write_json = onecard.loop.write_json
    full = []

    def final_weights_fail(*args, **kwargs):
        full.append(True)
        raise OSError(28, "No space left on device")

    def write_json(path, data):
        if full:
            raise OSError(28, "No space left on device")
        real_write_json(path, data)
    monkeypatch.setattr(session, "save_final", final_weights_fail)
    monkeypatch.setattr(onecard.loop, "write_json", write_json)
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 1
    err = capsys.readouterr().err
    assert "the final weights could not be written" in err and f"resume with: onecard train --run-dir {run_dir}" in err
    monkeypatch.undo()
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_a_resume_with_other_eval_batches_says_its_bits_per_byte_are_not_comparable(setup, tmp_path):
    """Another --eval-batches on resume scores other rows: the run's end compared with its step 0
    (and its chart) mixed two validation sets without a word."""
    run(setup, tmp_path, eval_batches=2, stop_after=3)
    messages = []
    run(setup, tmp_path, eval_batches=1, messages=messages)
    assert any("scores 4 validation rows where the run scored 8" in m for m in messages), messages
    messages.clear()
    run(setup, tmp_path, eval_batches=1, steps=STEPS + 1, messages=messages)  # the run now scores 4
    assert not any("validation rows" in m for m in messages), messages
