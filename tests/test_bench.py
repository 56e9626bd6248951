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
