"""`onecard bench` says what it is doing while it measures, and what it measured instead of a card it lacks."""

import pytest
import torch

from onecard.cli import main

SMALL = ["--no-save", "--depth", "1", "--seq-len", "16", "--micro-batch", "1", "--steps", "2", "--size", "64"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the CPU")
def test_bench_shows_progress_and_says_a_gpu_it_cannot_see(capsys):
    assert main(["bench", *SMALL, "--gpu", "rtx4070", "--json"]) == 0
    said = capsys.readouterr()
    assert said.out.lstrip().startswith("{")  # the record alone on stdout
    assert "timing 64^3 matmuls" in said.err and "timing 2 training steps of d1" in said.err
    assert "--gpu rtx4070 names a CUDA card, and this PyTorch sees none: measuring the CPU" in said.err


def test_a_calibration_that_cannot_be_stored_is_said_before_measuring(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("")  # ONECARD_HOME names a file
    monkeypatch.setenv("ONECARD_HOME", str(home))
    assert main(["bench", *[a for a in SMALL if a != "--no-save"]]) == 2
    said = capsys.readouterr()
    assert f"onecard: error: cannot store a calibration in {home}" in said.err and "--no-save" in said.err
    assert "timing" not in said.err  # nothing measured, nothing lost


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without FP8")
def test_a_recipe_this_machine_cannot_run_is_refused_before_measuring(capsys):
    assert main(["bench", *SMALL, "--recipe", "lean-fp8"]) == 2
    said = capsys.readouterr()
    assert "onecard: error: lean-fp8 cannot run here: matmul=fp8 needs an NVIDIA GPU" in said.err
    assert "timing" not in said.err  # the matmul was timed first, then thrown away
