"""Shared by the tests that stop a real `onecard train` process; every test gets PyTorch's thread count
as it was."""

import signal
import subprocess
import time
from pathlib import Path

import pytest


def _sigterm_once_training(argv: list[str], run_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `argv`, wait until its log has a step line, send SIGTERM, and return what it printed."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + timeout
    while not (log.exists() and '"loss"' in log.read_text()):  # training has begun
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, process.returncode, out, None)


@pytest.fixture
def sigterm_once_training():
    return _sigterm_once_training


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`onecard chat` and `sample` set PyTorch's threads (--threads, default 1) in the process that runs them:
    a test that runs them in-process would leave every later test on one thread."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
