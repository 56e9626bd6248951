"""`onecard report`: the PNG files and the HTML page exist, the images decode, predictions show."""

import base64
import io
import json
import re

import matplotlib.image as mpimg
import pytest

from onecard.report import write_report

CHARTS = ["loss.png", "val_bpb.png", "tokens_per_s.png", "memory.png", "power.png", "energy.png"]


def write_run(run_dir, cuda: bool, prediction: dict | None = None):
    """A run directory as train() leaves it: log.jsonl, config.json, summary.json."""
    run_dir.mkdir()
    lines = [{"step": 0, "val_bpb": 3.0, "time": 0.0}, {"event": "start", "step": 0, "time": 0.0}]
    for step in range(1, 21):
        lines.append({
            "step": step, "loss": 5.0 / step, "grad_norm": 1.0, "lr_multiplier": 1.0, "skipped": False,
            "step_time_s": 2.0, "tokens": 1000 * step, "tokens_per_s": 500.0 + step, "mfu": 0.3 if cuda else None,
            "vram_bytes": 2**30 if cuda else None, "vram_peak_bytes": 2 * 2**30 if cuda else None,
            "host_peak_bytes": 2**29, "power_w": 200.0 if cuda else None,
            "energy_kwh": 200 * 2 * step / 3.6e6 if cuda else None, "energy_estimated": False, "cost": None,
            "wall_s": 2.0 * step, "eta_s": 2.0 * (20 - step), "time": 2.0 * step,
            **({"val_bpb": 3.0 - step / 10} if step % 10 == 0 else {})})
        if step == 10:
            lines += [{"event": "checkpoint", "step": 10, "time": 20.0}, {"event": "stop", "step": 10, "time": 20.0},
                      {"event": "resume", "step": 10, "time": 30.0}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 21, "lo')
    config = {"model_config": {"n_layer": 2}, "recipe": {"name": "baseline"}, "train": {"total_batch": 1000},
              "prediction": prediction}
    (run_dir / "config.json").write_text(json.dumps(config))
    summary = {"status": "finished", "step": 20, "steps": 20, "device": "cuda" if cuda else "cpu",
               "vram_peak_bytes": 2 * 2**30 if cuda else None, "energy_kwh": 0.0022 if cuda else None,
               "energy_sources": ["nvml"] if cuda else [], "tokens": 20000, "wall_s": 40.0,
               "prediction": prediction}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("cuda", [True, False])
def test_report_files_exist_and_images_decode(tmp_path, cuda):
    prediction = {"peak_bytes": int(2.5 * 2**30), "peak_allocated_bytes": int(2.2 * 2**30), "step_time_s": 1.8}
    write_run(tmp_path / "run", cuda, prediction if cuda else None)
    page = write_report(tmp_path / "run")
    assert page == tmp_path / "run" / "report" / "report.html"
    for name in CHARTS:
        image = mpimg.imread(page.parent / name)
        assert image.shape[0] > 100 and image.shape[1] > 300
    text = page.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == len(CHARTS)
    for data in embedded:
        assert mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png").ndim == 3
    assert "<th>sessions</th><td>2</td>" in text
    if cuda:  # the planner's figures beside the measured ones
        assert "Planner's prediction and measurement" in text
        assert "<td>peak allocated</td><td>2.20 GiB</td><td>2.00 GiB (torch.cuda.max_memory_allocated)</td>" in text
        assert "<td>step time</td><td>1.800 s</td><td>2.000 s (median of" in text
    else:
        assert "predicted" not in text


def test_report_command(tmp_path, capsys):
    from onecard.cli import main  # here, so the other tests need only onecard.report

    write_run(tmp_path / "run", cuda=False)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(CHARTS + ["report.html"])
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onecard: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("summary", [{"status": "finished", "step": 10, "steps": 10, "wall_s": 20.0}, None])
def test_a_log_past_its_summary_is_shown_as_a_run_that_went_on(tmp_path, summary):
    """A killed resume leaves the last session's "finished" (or, before its first checkpoint, no
    summary at all): the page shows how far the log went, not a finished run or a run time of 0."""
    run = tmp_path / "run"
    write_run(run, cuda=False)
    if summary is None:
        (run / "summary.json").unlink()
    else:
        (run / "summary.json").write_text(json.dumps(summary))
    page = write_report(run).read_text()
    facts = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page))
    assert facts["status"].startswith("running, or stopped without writing its summary (the log reaches step 20")
    assert facts["step"].startswith("20 of ") and facts["run time"] == "0 min 40 s"
    assert facts["validation bits per byte"] == "3.0000 → 1.0000"  # the log's first and latest, not the dashes
    # the log's counts, not the older summary's (or none): 20 steps of 1,000 tokens in 40 s
    assert facts["tokens"] == "20,000" and facts["tokens/s (mean over run time)"] == "500"


def test_the_page_writes_numbers_as_the_terminal_does(tmp_path):
    run = tmp_path / "run"
    write_run(run, cuda=False)
    summary = json.loads((run / "summary.json").read_text())
    summary |= {"val_bpb_start": 3.609933, "val_bpb_end": 2.5907985, "tokens_per_s_mean": 5005.57,
                "cost": 1234.5678, "currency": "EUR"}
    (run / "summary.json").write_text(json.dumps(summary))
    facts = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", write_report(run).read_text()))
    assert facts["validation bits per byte"] == "3.6099 → 2.5908"  # as training's last line and the card
    assert facts["tokens/s (mean over run time)"] == "5,006"
    assert facts["cost"] == "1,234.57 EUR"  # as the card and the progress line (it was 1235 EUR, or 4.371e-05)


def figures_drawn(monkeypatch) -> dict:
    """The figures write_report saves, by file name, as they are when saved."""
    from matplotlib.figure import Figure

    drawn, save = {}, Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: save(drawn.setdefault(path.name, fig), path, **kw))
    return drawn


def test_a_long_log_is_drawn_as_means_with_the_lowest_and_highest(tmp_path, monkeypatch):
    """70,000 steps drawn point by point were a solid band: past BINS points a chart draws the mean of
    each run of steps over a band from their lowest to highest value, and says so; a lone spike stays."""
    from onecard import report

    monkeypatch.setattr(report, "BINS", 400, raising=False)
    run, n = tmp_path / "run", 1998  # 399 runs of 5 steps and one of 3
    run.mkdir()
    steps = [{"step": s, "loss": 3.0 + (s % 2) + (50.0 if s == 777 else 0.0), "tokens_per_s": 1000.0,
              "wall_s": 10.0 * s} for s in range(1, n + 1)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    drawn = figures_drawn(monkeypatch)
    text = write_report(run).read_text()
    for ax in drawn["loss.png"].axes:
        (line,) = ax.get_lines()
        assert len(line.get_xdata()) == 400
        assert line.get_ydata()[0] == pytest.approx(3.6)  # the mean of steps 1 to 5: 4, 3, 4, 3, 4
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        assert band.min() == 3.0 and band.max() == 54.0  # the lowest step and the spike
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "loss: mean of each 5 steps", "loss: lowest to highest of each 5 steps"]
    assert 'alt="training loss (loss (nats)) against step and run time; line: mean of each 5 steps' in text


def test_the_page_reads_on_a_phone(tmp_path):
    """Without a viewport tag a phone laid the page out 980 pixels wide and shrank it to 40 % (text of
    5 pixels); now the page is as wide as the phone, and the charts (720 pixels, their labels legible)
    and the card's twelve columns scroll sideways in their own boxes."""
    from tests.browser import start_chromium

    write_run(tmp_path / "run", cuda=False)
    (tmp_path / "run" / "eval.json").write_text(json.dumps({"format": 1, "tasks": {
        "bpb": {"metric": "bits per byte", "value": 1.25, "examples": 4096, "max_per_task": None}}}))
    page = write_report(tmp_path / "run")
    assert "<h2>Evaluation</h2>\n<table>" in page.read_text()  # the card is there
    chrome = start_chromium(phone_width=390)
    try:
        chrome.get(page.as_uri())
        inner, wide, charts = chrome.execute_script(
            "return [innerWidth, document.documentElement.scrollWidth,"
            " [...document.images].map(i => i.getBoundingClientRect().width)]")
    finally:
        chrome.quit()
    assert inner == wide == 390
    assert len(charts) == len(CHARTS) and min(charts) == 720


def test_a_cpu_run_says_which_memory_and_power_it_draws(tmp_path):
    """A lone line has no legend: the CPU's memory chart was titled "memory" with nothing saying it is the
    host's peak resident memory, and its power chart "GPU power" on a run without a GPU."""
    write_run(tmp_path / "run", cuda=False)
    alts = re.findall(r'<img alt="([^"]*)"', write_report(tmp_path / "run").read_text())
    assert alts[3].startswith("memory: host peak (resident) (GiB)") and alts[4].startswith("power (watts)")
    write_run(tmp_path / "gpu", cuda=True)
    alts = re.findall(r'<img alt="([^"]*)"', write_report(tmp_path / "gpu").read_text())
    assert alts[3].startswith("memory (GiB)") and alts[4].startswith("GPU power (watts)")


@pytest.mark.parametrize("stretch, unit", [(1, "seconds"), (10, "minutes"), (360, "hours"), (10_000, "days")])
def test_run_time_is_drawn_in_a_unit_the_run_spans(tmp_path, monkeypatch, stretch, unit):
    """The right-hand panels were always in hours: a 40-second run's axis read 0.002 to 0.011 hours."""
    run = tmp_path / "run"
    write_run(run, cuda=False)  # 20 steps, 2 s apart
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()[:-1]]
    (run / "log.jsonl").write_text("".join(json.dumps({**r, "wall_s": r["wall_s"] * stretch} if "wall_s" in r else r)
                                           + "\n" for r in lines))
    drawn = figures_drawn(monkeypatch)
    write_report(run)
    panel = drawn["loss.png"].axes[1]
    seconds = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}[unit]
    assert panel.get_xlabel() == f"{unit} of run time"
    assert panel.get_lines()[0].get_xdata()[-1] == pytest.approx(40 * stretch / seconds)
