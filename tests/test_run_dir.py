"""The run directory: one process at a time (a lock that a killed process does not leave
behind), typed config.json, and what a continued run keeps."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from onecard.cli import main
from onecard.errors import UsageError
from onecard.run import RunConfig, RunLock

TINY = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "16",
        "--micro-batch", "2", "--total-batch", "64", "--eval-every", "0", "--eval-batches", "1"]


def hold_lock(run_dir):
    """A separate process that takes the run directory's lock and waits to be killed."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from onecard.run import RunLock
        with RunLock(Path({str(run_dir)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        code = main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "2"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"in use by another onecard process (pid {holder.pid})" in err and len(err.strip().splitlines()) == 1
        assert not (run_dir / "log.jsonl").exists()  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run_dir / ".lock").exists()  # the file stays; the operating system's lock went with the process
    code = main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_the_lock_is_released_for_the_next_session(tmp_path):
    with RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # the same process again, and no error
        pass


def test_a_command_that_fails_before_writing_leaves_no_run_directory(tmp_path, capsys):
    new = tmp_path / "new"
    assert main(["train", "--run-dir", str(new), *TINY, "--total-batch", "100", "--steps", "1"]) == 2
    assert not new.exists()
    with pytest.raises(RuntimeError), RunLock(tmp_path):  # a directory that was there stays
        raise RuntimeError
    assert tmp_path.is_dir()


def test_two_runs_at_once_one_trains_and_one_is_refused(tmp_path):
    """Two real `onecard train` processes on one directory: exactly one trains, the other exits 2."""
    run_dir = tmp_path / "run"
    # enough steps that the first still trains while the second starts up, however loaded the machine
    argv = [sys.executable, "-m", "onecard.cli", "train", "--run-dir", str(run_dir), *TINY, "--steps", "200"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run_dir / ".lock.owner").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "in use by another onecard process" in second.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 201))  # each step logged once


def test_run_dir_that_is_a_file_or_cannot_be_made(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for run_dir in (a_file, a_file / "under", "/proc/onecard-run"):
        assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("onecard: error:") and len(err.strip().splitlines()) == 1, err


def test_config_json_round_trips_and_refuses_what_it_cannot_read(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "1"]) == 0
    data = json.loads((run_dir / "config.json").read_text())
    assert data["format"] == 1
    assert RunConfig.from_dict(data).to_dict() == data
    for bad in ({}, [1, 2], {"model_config": {"n_layer": "x"}, "recipe": {}, "train": {}, "corpus": ""}):
        with pytest.raises(UsageError):
            RunConfig.from_dict(bad)
    for key, value in (("data", 5), ("steps", "3"), ("steps", True), ("force_new", 1), ("price", "cheap")):
        with pytest.raises(UsageError, match=rf"^config.json: train.{key} is .*, not "):
            RunConfig.from_dict({**data, "train": {**data["train"], key: value}})
    assert RunConfig.from_dict({**data, "train": {**data["train"], "price": 0.2, "data": None}})
    for value in ([1], 5):
        with pytest.raises(UsageError, match=r"^config.json: init_from is .*, not str \| None"):
            RunConfig.from_dict({**data, "init_from": value})


def test_a_damaged_config_json_is_read_from_the_newest_checkpoint(tmp_path, capsys):
    """config.json empty (a power cut as it was replaced) or gone: each checkpoint holds a copy."""
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "2", "--save-every-steps", "1",
                 "--seed", "3"]) == 0
    for steps, damage in ((3, ""), (4, "{"), (5, None)):
        if damage is None:
            (run_dir / "config.json").unlink()
        else:
            (run_dir / "config.json").write_text(damage)
        assert main(["train", "--run-dir", str(run_dir), "--steps", str(steps)]) == 0
        assert f"resuming from step {steps - 1} of {steps}" in capsys.readouterr().out
    assert RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())).train.seed == 3
    for name in ("config.json", f"checkpoints/step_{5:06d}/config.json"):  # the newest copy damaged too
        (run_dir / name).write_text("{")
    assert main(["train", "--run-dir", str(run_dir), "--steps", "6"]) == 0  # an older checkpoint's copy
    assert "resuming from step 4 of 6" in capsys.readouterr().out
    for path in [run_dir / "config.json", *run_dir.glob("checkpoints/step_*/config.json")]:
        path.write_text("{")
    assert main(["train", "--run-dir", str(run_dir), "--steps", "7"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.count("cannot read") >= 2 and "--force-new" in err


@pytest.mark.parametrize("name", ["log.jsonl", "summary.json"])
def test_a_run_file_turned_into_a_directory_is_a_one_line_error(tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "1"]) == 0
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onecard: error: [Errno 21] Is a directory") and name in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_config_asking_for_a_huge_model_is_refused_before_building_it(tmp_path, capsys):
    """A damaged config.json (a billion layers) would take hours to build (the test would hang):
    every command that reads it checks it against the weights first (on resume, the checkpoint's
    own config)."""
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "1"]) == 0
    data = json.loads((run_dir / "config.json").read_text())
    data["model_config"]["n_layer"] = 10 ** 9
    (run_dir / "config.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), *TINY[:2], "--steps", "2"]) == 2
    assert "model n_layer 1 -> 1000000000" in capsys.readouterr().err
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", "a", "--max-tokens", "1", "--device", "cpu"]) == 2
    assert re.search(r"config.json describes a model of [\d,]+ parameters, but .*model.safetensors holds [\d,]+: ",
                     capsys.readouterr().err)


def test_weights_under_the_wrong_names_say_which(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "1"]) == 0
    state = load_file(run_dir / "model.safetensors")
    state["renamed"] = state.pop("lm_head.weight")
    save_file(state, run_dir / "model.safetensors")
    capsys.readouterr()
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", "a", "--max-tokens", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'Missing key(s) in state_dict: "lm_head.weight"' in err
    assert 'Unexpected key(s) in state_dict: "renamed"' in err


def test_init_from_a_run_keeps_its_batch_and_context(tmp_path, capsys):
    """Continuing a demo-sized run must not jump to the 524,288-token default batch."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--run-dir", str(first), *TINY, "--steps", "1"]) == 0
    assert main(["train", "--run-dir", str(second), "--init-from", str(first), "--device", "cpu", "--steps", "1",
                 "--eval-batches", "1"]) == 0, capsys.readouterr().err
    saved = json.loads((second / "config.json").read_text())
    assert saved["train"]["total_batch"] == 64 and saved["recipe"]["seq_len"] == 16


def test_init_from_refuses_another_depth_or_vocabulary_rather_than_ignoring_it(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--run-dir", str(first), *TINY, "--steps", "1"]) == 0
    capsys.readouterr()
    for extra, said in ((["--depth", "3"], "depth 1, not 3"), (["--vocab-size", "512"], "not --vocab-size 512")):
        assert main(["train", "--run-dir", str(second), "--init-from", str(first), "--device", "cpu",
                     "--steps", "1", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
    assert not (second / "model.safetensors").exists()


def test_a_run_directory_deleted_while_training_stops_the_run_without_recreating_it(tmp_path, capsys, monkeypatch):
    import shutil

    from onecard import checkpoint

    run_dir = tmp_path / "run"
    real_save = checkpoint.save

    def save_then_delete(directory, step, *args, **kwargs):
        path = real_save(directory, step, *args, **kwargs)
        if step == 1:
            shutil.rmtree(directory)  # `rm -rf runs/x` in another terminal
        return path
    monkeypatch.setattr(checkpoint, "save", save_then_delete)
    code = main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "3", "--save-every-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "was deleted or moved while training" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_the_log_cut_back_on_resume_is_its_tail_cut_in_place(tmp_path, monkeypatch):
    """A resume drops the crashed session's lines after the checkpoint. They are the log's tail: it was read
    whole and rewritten on every resume (1.2 s for a 70,000-step log of 35 MB, and as much free disk again),
    where cutting the tail in place takes milliseconds. The cut reaches the disk; a clean stop's log is left
    as it is."""
    from onecard.run import truncate_log

    log = tmp_path / "log.jsonl"
    clean = "".join(json.dumps({"step": n, "loss": 1.0}) + "\n" for n in range(4))
    clean += '{"event": "checkpoint", "step": 3}\n'
    log.write_text(clean + "".join(json.dumps({"step": n}) + "\n" for n in (4, 5)) + '{"step": 6, "lo')
    inode = log.stat().st_ino
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    truncate_log(log, 3)
    assert log.read_text() == clean and log.stat().st_ino == inode and synced == [inode]
    before = log.stat().st_mtime_ns
    truncate_log(log, 3)  # the resume after a stop that wrote its checkpoint last: nothing to drop
    assert log.read_text() == clean and log.stat().st_mtime_ns == before and synced == [inode]


def test_the_log_reaches_the_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """Checkpoints are fsynced; the log's lines were only flushed to the page cache. After a power cut the run
    resumed from its checkpoint with the steps just before it missing from log.jsonl for good."""
    from onecard import checkpoint

    run_dir = tmp_path / "run"
    log = run_dir / "log.jsonl"
    events = []
    real_fsync, real_save = os.fsync, checkpoint.save

    def fsync(fd):
        if log.exists() and os.fstat(fd).st_ino == log.stat().st_ino:
            events.append(("log synced", log.read_text().count('"loss"')))
        return real_fsync(fd)

    def save(directory, step, *args, **kwargs):
        events.append(("checkpoint", step))
        return real_save(directory, step, *args, **kwargs)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(checkpoint, "save", save)
    assert main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "2", "--save-every-steps", "1"]) == 0
    assert events == [("log synced", 1), ("checkpoint", 1), ("log synced", 2), ("checkpoint", 2)]


def test_a_kept_last_line_without_its_newline_gets_one(tmp_path):
    """A crash between a line and its newline: the resume's first line must not join it."""
    from onecard.run import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}')
    truncate_log(log, 1)
    assert log.read_text() == '{"step": 0}\n{"step": 1}\n'
    log.write_text('{"step": 2}\n{"step": 3}\n')
    truncate_log(log, 1)  # nothing at or before the checkpoint
    assert log.read_text() == ""


@pytest.mark.parametrize("block", [1, 5, 64, 1 << 16])
def test_lines_read_from_the_end_are_the_lines(tmp_path, block):
    """Lines longer and shorter than a block, empty ones, and none after the last newline."""
    from onecard.run import _lines_from_the_end

    data = b'{"step": 1}\n\n' + b"x" * 200 + b'\n{"step": 22}\nab\n' + b"y" * 70
    path = tmp_path / "log.jsonl"
    for content in (data, data + b"\n", b"", b"\n"):
        path.write_bytes(content)
        with open(path, "rb") as f:
            got = list(_lines_from_the_end(f, len(content), block))
        assert [line for _, line in got] == content.split(b"\n")[::-1]
        assert all(content[end - len(line):end] == line and content[end:end + 1] in (b"\n", b"") for end, line in got)


def test_two_set_asides_in_one_second_keep_both(tmp_path, monkeypatch):
    """The folder is named by the second: a second set-aside in that second failed with 'File exists'."""
    from onecard import run

    monkeypatch.setattr(run.time, "strftime", lambda _fmt: "20261130-015500")
    asides = []
    for step in (1, 2):
        (tmp_path / "log.jsonl").write_text(json.dumps({"step": step}) + "\n")
        asides.append(run.set_aside(tmp_path, only_run_files=True))
    assert [p.name for p in asides] == ["previous-20261130-015500", "previous-20261130-015500-2"]
    assert [json.loads((p / "log.jsonl").read_text())["step"] for p in asides] == [1, 2]
