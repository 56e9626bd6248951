"""Meters: energy integration, estimates never passed off as measurements, totals across sessions,
the progress display."""

import io
import time

import pytest

from onecard import meters
from onecard.meters import Meters, PowerMeter, Progress, format_duration, status_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(meters.time, "monotonic", clock)
    return clock


def test_nvml_power_is_integrated_by_the_trapezoid_rule(clock):
    readings = iter([100.0, 200.0, 200.0, 50.0])
    power = PowerMeter(lambda: next(readings))
    assert power.source == "nvml"
    power.sample()  # t = 100 s: 100 W
    clock.now = 101.0
    power.sample()  # 1 s at (100 + 200) / 2 W
    clock.now = 103.0
    power.sample()  # 2 s at 200 W
    assert power.joules() == pytest.approx(150 + 400)
    assert power.watts() == 200.0
    clock.now = 104.0
    power.sample()  # 1 s at (200 + 50) / 2 W
    assert power.joules() == pytest.approx(675)


def test_background_sampling_thread_runs_and_stops():
    reads = []
    power = PowerMeter(lambda: reads.append(1) or 300.0, interval_s=0.01)
    started = time.monotonic()
    power.start()
    time.sleep(0.1)
    power.stop()
    elapsed = time.monotonic() - started
    # constant 300 W from the first sample (at start) to the last (at stop)
    assert 300 * 0.1 <= power.joules() <= 300 * elapsed
    assert len(reads) >= 3
    count = len(reads)
    time.sleep(0.05)
    assert len(reads) == count  # stopped


def test_stated_power_is_an_estimate_and_no_power_is_none(clock):
    stated = PowerMeter(None, stated_watts=250.0).start()
    clock.now += 3600
    assert stated.source == "estimate" and stated.joules() == pytest.approx(250 * 3600)
    unknown = PowerMeter(None).start()
    assert unknown.source is None and unknown.joules() is None and unknown.watts() is None


def test_meters_energy_cost_and_eta(clock):
    m = Meters("cpu", flops_per_token=1000, total_steps=10, power=PowerMeter(None, 360.0).start(), price=0.5,
               currency="EUR")
    first = m.step(1, tokens=100, step_time_s=2.0)
    assert first["tokens_per_s"] == 50 and first["mfu"] is None and first["vram_bytes"] is None
    assert first["eta_s"] is None and first["energy_kwh"] == 0
    clock.now += 10_000
    second = m.step(2, tokens=100, step_time_s=2.0)
    assert second["tokens"] == 200 and second["eta_s"] == pytest.approx(8 * 10_000)
    assert second["energy_kwh"] == pytest.approx(1.0)  # 360 W for 10 000 s
    assert second["energy_estimated"] is True and second["cost"] == pytest.approx(0.5)
    assert second["wall_s"] == pytest.approx(10_000)


def test_without_a_power_figure_energy_and_cost_stay_null(clock):
    m = Meters("cpu", 1000, 10, PowerMeter(None), price=0.3)
    record = m.step(1, 100, 1.0)
    assert record["energy_kwh"] is None and record["cost"] is None and record["power_w"] is None
    assert m.summary()["energy_sources"] == [] and m.summary()["energy_kwh"] is None


def test_totals_add_up_across_sessions(clock):
    first = Meters("cpu", 1000, 10, PowerMeter(None, 100.0).start())
    first.step(1, 100, 1.0)
    clock.now += 36
    saved = first.totals()
    assert saved["energy_j"] == pytest.approx(3600) and saved["wall_s"] == pytest.approx(36)
    # the next session has no power figure at all: its time is counted as uncounted, not invented
    second = Meters("cpu", 1000, 10, PowerMeter(None), totals=saved)
    clock.now += 64
    record = second.step(2, 100, 1.0)
    assert record["tokens"] == 200 and record["wall_s"] == pytest.approx(100)
    assert record["energy_kwh"] == pytest.approx(0.001)  # only the first session's 3600 J
    summary = second.summary()
    assert summary["energy_sources"] == ["estimate"] and summary["energy_uncounted_s"] == pytest.approx(64)


def test_a_new_price_on_resume_prices_the_energy_from_there_on(clock):
    """The cost was all the run's energy × the latest --price: a tariff changed over the months of a run
    re-priced every kWh used before (1 kWh at 0.30, then 1 kWh at 0.60 came to 1.20, not 0.90)."""
    first = Meters("cpu", 1000, 10, PowerMeter(None, 1000.0).start(), price=0.30, currency="EUR")
    clock.now += 3600
    saved = first.totals()
    second = Meters("cpu", 1000, 10, PowerMeter(None, 1000.0).start(), price=0.60, currency="EUR", totals=saved)
    clock.now += 3600
    record = second.step(1, 100, 1.0)
    assert record["energy_kwh"] == pytest.approx(2.0) and record["cost"] == pytest.approx(0.90)
    assert saved["cost"] == pytest.approx(0.30) and saved["currency"] == "EUR"
    assert second.summary()["cost"] == pytest.approx(0.90) and second.totals()["cost"] == pytest.approx(0.90)
    # a cost in another currency cannot be added to: all the energy is priced in the new one
    third = Meters("cpu", 1000, 10, PowerMeter(None, 1000.0).start(), price=0.50, currency="USD",
                   totals=second.totals())
    assert third.summary()["cost"] == pytest.approx(1.0)


def test_mfu_uses_the_cards_peak(monkeypatch, clock):
    monkeypatch.setattr(meters, "card_peak_flops", lambda device: ("Test Card", 1e12))
    monkeypatch.setattr(meters.torch.cuda, "memory_allocated", lambda: 2**30)
    monkeypatch.setattr(meters.torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    m = Meters("cuda", flops_per_token=10**6, total_steps=10, power=PowerMeter(None))
    record = m.step(1, tokens=1000, step_time_s=2.0)
    assert record["mfu"] == pytest.approx(10**6 * 500 / 1e12)
    assert record["vram_peak_bytes"] == 3 * 2**30 and m.summary()["gpu"] == "Test Card"


def test_cpu_has_no_peak_flops():
    assert meters.card_peak_flops("cpu") == (None, None)
    assert meters.nvml_power_reader("cpu") is None


def test_plain_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(20, stream=stream, every=10, currency="EUR") as progress:
        for step in range(1, 21):
            record = {"loss": 2.0, "tokens_per_s": 1234.0, "wall_s": step, "eta_s": 20 - step, "cost": 0.1}
            if step == 5:
                record["val_bpb"] = 1.5
            progress.update(step, record)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 5/20", "step 10/20", "step 20/20"]
    assert "val 1.5000 bpb" in lines[0] and "1,234 tok/s" in lines[1] and "0.10 EUR" in lines[1]


def test_live_progress_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress(3, stream=stream) as progress:
        for step in (1, 2, 3):
            progress.update(step, {"loss": 1.0, "tokens_per_s": 10.0, "wall_s": 1.0})
    assert progress.live and "step 3/3" in stream.getvalue() and "loss 1.0000" in stream.getvalue()


def test_progress_shows_the_losses_debiased_moving_average():
    stream = io.StringIO()
    with Progress(3, stream=stream, every=1) as progress:
        for step, loss in ((1, 4.0), (2, 2.0), (3, None)):
            progress.update(step, {"loss": loss, "wall_s": 1.0})
    lines = stream.getvalue().splitlines()
    # 0.1 x 4 / (1 - 0.9) = 4; (0.9 x 0.4 + 0.1 x 2) / (1 - 0.81) = 2.9474; a skipped step says so
    assert "smoothed loss 4.0000" in lines[0] and "smoothed loss 2.9474" in lines[1] and "loss skipped" in lines[2]


def test_status_line_shows_what_was_measured():
    line = status_line(7, 9, {"loss": None, "mfu": 0.42, "vram_bytes": 2**30, "vram_peak_bytes": 2 * 2**30,
                              "power_w": 180.0, "energy_kwh": 1.5, "energy_estimated": True, "wall_s": 90})
    assert line.startswith("step 7/9 | loss skipped")
    assert "MFU 42.0%" in line and "VRAM 1.0/2.0 GiB" in line and "180 W" in line and "~1.500 kWh" in line
    assert format_duration(90061) == "1 d 01 h" and format_duration(3700) == "1 h 01 min"
    assert format_duration(65) == "1 min 05 s" and format_duration(float("nan")) == "0 min 00 s"
