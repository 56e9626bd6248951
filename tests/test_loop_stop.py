"""Ranks leave the training loop together: a signal reaches each rank at its own moment, and a rank
that left on its own flag would leave the others waiting in the next step's collective."""

import io
from types import SimpleNamespace

import onecard.loop
from onecard.distributed import World
from onecard.loop import Loop, StopRequest
from onecard.run import TrainSettings
from onecard.step import StepOutcome


class Meters:
    def step(self, step, tokens, seconds, skipped):
        return {}


def test_a_signal_landing_after_the_ranks_agreed_waits_for_the_next_agreement(tmp_path, monkeypatch):
    trained = []
    stop = StopRequest()

    def any_rank(flag, world, device):
        agreed = flag  # the other rank has no request yet: the all-reduce returns this rank's flag
        if len(trained) == 1 and not stop.reason:  # the signal lands just after the all-reduce returned
            stop.request("signal", "SIGTERM")
        return agreed

    monkeypatch.setattr(onecard.loop.distributed, "any_rank", any_rank)
    monkeypatch.setattr(onecard.loop.distributed, "from_rank0", lambda value, world: value)  # rank 0 agrees
    settings = TrainSettings(run_dir=tmp_path, steps=10, total_batch=64, eval_every=0, save_every_min=0)
    # this rank's part in a checkpoint: its optimizer states go to rank 0
    opt = SimpleNamespace(state_dict=lambda: None)
    loop = Loop(model=None, opt=opt, batches=None, accum=1, evaluate=lambda: 0.0, schedule=lambda step: 1.0,
                train_step=lambda batches, accum, should_stop: trained.append(1) or StepOutcome(1.0, 1.0),
                config=SimpleNamespace(train=settings), meters=Meters(), out_of_memory=str,
                world=World(rank=1, size=2), log=lambda *_: None)
    loop.run(stop, SimpleNamespace(update=lambda step, record: None), io.StringIO(), resumed=True)
    # the other rank saw no stop after step 1 either, so it trains step 2: this rank must too, and
    # both leave after step 2, where the all-reduce carries this rank's request to every rank
    assert len(trained) == 2 and loop.step == 2
    assert loop.status == "stopped" and loop.message == "SIGTERM"


def test_a_signal_during_another_stop_keeps_its_reason_and_a_second_quits(capfd):
    """Ctrl-C while the checkpoint of a non-finite stop is written used to turn the stop into a
    signal's (exit 0 instead of 1); a rank told to stop by another rank quit at its own first Ctrl-C."""
    import signal

    import pytest

    stop = StopRequest()
    stop.request("nonfinite", "5 steps in a row had a non-finite loss")
    stop._handle(signal.SIGINT, None)
    assert stop.reason == "nonfinite" and "already stopping (nonfinite)" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    told = StopRequest()
    told.request("signal", "another rank was asked to stop: stopping with it")
    told._handle(signal.SIGTERM, None)  # this rank's own first signal: not yet a quit
    with pytest.raises(KeyboardInterrupt):
        told._handle(signal.SIGTERM, None)


def test_under_torchrun_a_signal_and_its_forwarded_echo_are_one_stop(capfd, monkeypatch):
    """systemd, SLURM and a terminal's Ctrl-C signal every process, and torchrun forwards the same
    signal a moment later: that second copy used to quit each rank at once, with no checkpoint."""
    import signal

    import pytest

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    clock = iter([100.0, 100.05, 106.0, 200.0])
    monkeypatch.setattr(onecard.loop.time, "monotonic", lambda: next(clock))
    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # torchrun's copy, 50 ms later: the same stop
    assert stop.reason == "signal" and capfd.readouterr().err == ""  # rank 1 leaves the words to rank 0
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGTERM, None)  # 6 s later: the user means it
    monkeypatch.setenv("RANK", "0")
    stop = StopRequest()
    stop._handle(signal.SIGINT, None)
    assert "again after 5 s to quit at once" in capfd.readouterr().err
