"""Two ranks started by torchrun (gloo on the CPU) train what one process trains with the same
total batch: the ranks take turns through the token stream and average their gradients."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["train", "--depth", "1", "--vocab-size", "300", "--seq-len", "32", "--micro-batch", "2",
        "--total-batch", "256", "--steps", "3", "--eval-batches", "1", "--eval-every", "0", "--device", "cpu"]


def steps_of(run_dir):
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog "
                                                  f"{i % 7} " * 5}) for i in range(400)))
    one = subprocess.run([sys.executable, "-m", "onecard.cli", *ARGS, "--data", str(data),
                          "--run-dir", str(root / "one")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "onecard.cli", *ARGS, "--data", str(data), "--run-dir", str(root / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    return root, two


def test_two_ranks_train_what_one_process_trains(runs):
    root, _ = runs
    one, two = steps_of(root / "one"), steps_of(root / "two")
    # the same micro-batches make each step: the mean losses agree to float rounding
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["tokens"] for r in two] == [256, 512, 768]
    a, b = load_file(root / "one" / "model.safetensors"), load_file(root / "two" / "model.safetensors")
    for key in a:  # Muon's bf16 Newton-Schulz turns summation-order differences into ~1e-4
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-3, msg=key)


def test_rank_zero_alone_writes_and_speaks(runs):
    root, two = runs
    assert two.stdout.count("validation bits per byte:") == 1
    assert not (root / "two" / ".tokenizer-for-ranks").exists()
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["tokens"] == 768 and summary["ranks"] == 2
    from onecard.cli import main
    assert main(["report", str(root / "two")]) == 0
    assert "cpu x 2 ranks" in (root / "two" / "report" / "report.html").read_text()
    assert (root / "two" / "latest").read_text().strip() == "checkpoints/step_000003"


def test_two_ranks_given_a_tokenizer_train_what_one_process_trains(runs):
    """--tokenizer under torchrun: rank 0 reads it and hands it to rank 1. Given the tokenizer the single
    process trained for itself, the two ranks make its steps again."""
    from onecard.tokenizer import Tokenizer

    root, _ = runs
    given = root / "one" / "tokenizer"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "onecard.cli", *ARGS, "--data", str(root / "corpus.jsonl"), "--tokenizer", str(given),
                          "--run-dir", str(root / "given")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("tokenizer: 300 tokens from") == 1 and "training a" not in two.stdout
    assert Tokenizer.load(root / "given" / "tokenizer").same_as(Tokenizer.load(given))
    assert [r["loss"] for r in steps_of(root / "given")] == pytest.approx([r["loss"] for r in steps_of(root / "one")],
                                                                         rel=1e-5)


def test_sigterm_stops_every_rank_with_a_checkpoint_and_two_ranks_resume(tmp_path, sigterm_once_training):
    """torchrun passes SIGTERM to the ranks; they agree to stop at a step boundary, rank 0 saves."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "onecard.cli", "train", "--run-dir", str(run_dir), "--device", "cpu", "--depth", "1", "--vocab-size",
            "300", "--tokenizer-chars", "20000", "--seq-len", "16", "--micro-batch", "2", "--total-batch", "64",
            "--eval-every", "0", "--eval-batches", "1"]
    # torchrun itself exits 1 after a signal: the ranks' work is what counts
    stopped = sigterm_once_training(argv + ["--steps", "1000000"], run_dir)
    assert (run_dir / "summary.json").exists(), stopped.stdout[-3000:]  # what torchrun and the ranks said
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["last_checkpoint"]
    # the hint resumes it as it ran: under torchrun, on two ranks
    assert f"resume with: torchrun --standalone --nproc_per_node 2 -m onecard.cli train --run-dir {run_dir}" \
        in stopped.stdout
    step = summary["step"]
    assert (run_dir / "latest").read_text().strip() == f"checkpoints/step_{step:06d}"

    resumed = subprocess.run(argv + ["--steps", str(step + 2)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count(f"resuming from step {step} of {step + 2}") == 1  # rank 0 alone speaks
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_a_run_directory_in_use_is_refused_in_one_line_on_every_rank(runs):
    """Rank 0 alone takes the lock: its refusal used to leave rank 1 dying in a collective, with a
    40-line gloo traceback burying rank 0's one line."""
    from onecard.run import RunLock

    root, _ = runs
    busy = root / "busy"
    with RunLock(busy):  # another onecard process holds it
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "onecard.cli", *ARGS, "--data", str(root / "corpus.jsonl"), "--run-dir", str(busy)],
                             capture_output=True, text=True, timeout=300)
    assert two.returncode != 0
    assert two.stderr.count("is in use by another onecard process") == 1, two.stderr
    assert "RuntimeError" not in two.stderr and "gloo" not in two.stderr.lower(), two.stderr


def test_no_intact_checkpoint_is_one_line_on_every_rank(runs):
    """Rank 0 finds every checkpoint damaged and sets it aside: the other rank must neither read the run
    as new (and wait in another collective for ever) nor die in the barrier with a traceback."""
    import shutil

    root, _ = runs
    broken = root / "broken"
    shutil.copytree(root / "two", broken)
    for optimizer in broken.glob("checkpoints/step_*/optimizer.pt"):
        optimizer.write_bytes(b"0123456789")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "onecard.cli", *ARGS[:-6], "--steps", "5", "--eval-batches", "1", "--eval-every", "0",
                          "--device", "cpu", "--data", str(root / "corpus.jsonl"), "--run-dir", str(broken)],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode != 0
    # (torchrun's own ChildFailedError report follows; no rank may add a traceback of its own)
    assert "RuntimeError" not in two.stderr and "onecard/" not in two.stderr.replace("onecard/cli", ""), \
        two.stderr[-3000:]
    assert two.stderr.count("onecard: error:") == 1, two.stderr[-3000:]


def torchrun_fails(args: list[str]) -> subprocess.CompletedProcess:
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "onecard.cli", *args], capture_output=True, text=True, timeout=300)
    assert two.returncode != 0
    return two


def test_a_tokenizer_rank_zero_cannot_train_is_one_line_without_a_traceback(tmp_path):
    """Rank 0 alone trains the tokenizer: its refusal (a vocabulary the text cannot fill) used to leave
    rank 1 dying in the barrier with a traceback."""
    data = tmp_path / "tiny.txt"
    data.write_text("hello world, hello there\n" * 20)
    two = torchrun_fails([*ARGS[:3], "--vocab-size", "5000", *ARGS[5:], "--data", str(data),
                          "--run-dir", str(tmp_path / "run")])
    assert two.stderr.count("onecard: error: the training text supports a vocabulary of only") == 1, two.stderr
    assert "[rank1]" not in two.stderr and "onecard/" not in two.stderr.replace("onecard/cli", ""), two.stderr[-3000:]


def test_a_batch_the_ranks_cannot_share_is_said_once(tmp_path):
    """Every rank meets the same bad input: rank 0 alone says it, as it alone speaks otherwise."""
    data = tmp_path / "tiny.txt"
    data.write_text("hello world, hello there\n" * 20)
    two = torchrun_fails([*ARGS[:7], "--micro-batch", "3", "--total-batch", "256", "--device", "cpu",
                          "--data", str(data), "--run-dir", str(tmp_path / "run")])
    assert two.stderr.count("onecard: error: --total-batch 256 is not a multiple") == 1, two.stderr[-3000:]


OFFLOAD = ["--recipe", "offload", "--optim-states", "int8"]  # master copy, gradients and 8-bit states in CPU RAM


def train(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "onecard.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def offload_runs(runs):
    """A recipe whose master copy and states each rank holds only for the parameters it owns; one
    process and two ranks, each then resumed on the other number of ranks."""
    import shutil

    root, _ = runs
    given = [*ARGS, *OFFLOAD, "--data", str(root / "corpus.jsonl"), "--tokenizer", str(root / "one" / "tokenizer")]
    train([*given, "--run-dir", str(root / "offload-one")], 1)
    train([*given, "--run-dir", str(root / "offload-two")], 2)
    shutil.copytree(root / "offload-one", root / "one-then-two")
    shutil.copytree(root / "offload-two", root / "two-then-one")
    four = [*given[:given.index("--steps")], "--steps", "4", *given[given.index("--steps") + 2:]]
    train([*four, "--run-dir", str(root / "one-then-two")], 2)
    train([*four, "--run-dir", str(root / "two-then-one")], 1)
    # resumed with fp32 weights: the owners take theirs from the fp32 master copies, the others must get them
    baseline = [*four[:four.index("--recipe")], *four[four.index("--recipe") + 4:], "--recipe", "baseline"]
    for name, ranks in (("fp32-on-one", 1), ("fp32-on-two", 2)):
        shutil.copytree(root / "offload-one", root / name)
        train([*baseline, "--run-dir", str(root / name)], ranks)
    return root


def test_two_ranks_with_sharded_master_and_states_train_what_one_process_trains(offload_runs):
    root = offload_runs
    one, two = steps_of(root / "offload-one"), steps_of(root / "offload-two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    a, b = load_file(root / "offload-one" / "model.safetensors"), load_file(root / "offload-two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=2e-3, msg=key)


def test_a_master_copy_resumed_with_fp32_weights_reaches_every_rank(offload_runs):
    root = offload_runs
    one, two = steps_of(root / "fp32-on-one"), steps_of(root / "fp32-on-two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert two[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=1e-6)


def test_a_checkpoint_resumes_on_another_number_of_ranks(offload_runs):
    """Rank 0 gathers every rank's states into the checkpoint; each rank takes its own on resume."""
    root = offload_runs
    one_then_two, two_then_one = steps_of(root / "one-then-two"), steps_of(root / "two-then-one")
    assert [r["step"] for r in one_then_two] == [r["step"] for r in two_then_one] == [1, 2, 3, 4]
    assert one_then_two[-1]["loss"] == pytest.approx(two_then_one[-1]["loss"], rel=1e-5)
    optimizers = [torch.load(root / run / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=True)
                  for run in ("one-then-two", "two-then-one")]
    for saved_a, saved_b in zip(*optimizers, strict=True):
        for state_a, state_b in zip(saved_a["state"], saved_b["state"], strict=True):
            assert state_a.keys() == state_b.keys() and "master" in state_a
            torch.testing.assert_close(state_b["master"], state_a["master"], rtol=0, atol=2e-3)


@pytest.mark.parametrize("size, says", [("2", "RANK, MASTER_ADDR, MASTER_PORT not"), ("abc", "not a number")])
def test_a_world_size_left_in_the_environment_is_one_line(monkeypatch, capsys, size, says):
    """WORLD_SIZE without torchrun's other variables (a shell left it behind) ended in torch's traceback."""
    from onecard.cli import main

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", size)
    assert main(["train", "--device", "cpu", "--steps", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onecard: error: WORLD_SIZE=") and says in err and len(err.splitlines()) == 1, err
