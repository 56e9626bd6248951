"""`onecard report` on damaged runs: a one-line error or a page, never a traceback."""

import builtins
import json
import os
from pathlib import Path

import pytest
from test_report import CHARTS, write_run

from onecard.errors import UsageError
from onecard.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(run_dir: Path, out: Path | None = None) -> str:
    """The message `onecard report` would print (the CLI prints a UsageError as one line)."""
    with pytest.raises(UsageError) as caught:
        write_report(run_dir, out)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def test_matplotlib_is_a_core_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])


def test_missing_matplotlib_is_a_usage_error(tmp_path, monkeypatch):
    write_run(tmp_path / "run", cuda=False)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError, match="pip install matplotlib"):
        write_report(tmp_path / "run")


@pytest.mark.parametrize("bad", ["[1, 2]", "3", '"x"', "null", "true", "{", "\ufeff{}"])
def test_log_lines_that_are_not_objects_are_skipped(tmp_path, bad):
    write_run(tmp_path / "run", cuda=True)
    log = tmp_path / "run" / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([bad, *lines[:5], bad, *lines[5:]]) + "\n")
    page = write_report(tmp_path / "run")
    assert "skipped log lines" in page.read_text()
    assert sorted(p.name for p in page.parent.iterdir()) == sorted(CHARTS + ["report.html"])


def test_the_report_command_says_it_skipped_lines(tmp_path, capsys):
    from onecard.cli import main
    write_run(tmp_path / "run", cuda=True)
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text() + "{cut short\n[1]\n")
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "note: 2 lines of log.jsonl were cut short or are not JSON objects" in capsys.readouterr().out


def test_log_that_is_not_utf8(tmp_path):
    write_run(tmp_path / "run", cuda=False)
    log = tmp_path / "run" / "log.jsonl"
    good = log.read_bytes()
    log.write_bytes(os.urandom(3000) + b"\n" + good + b"\n\xff\xfe{\"step\": 99, \"loss\": 1.0}\n")
    text = write_report(tmp_path / "run").read_text()
    assert "<th>sessions</th><td>2</td>" in text  # the good lines still count
    log.write_bytes(bytes(range(256)) * 50)
    assert write_report(tmp_path / "run").exists()


WRONG = ["x", "abc", [1], {"a": 1}, True, None, -1, 10**400, float("nan"), float("inf")]


@pytest.mark.parametrize("value", WRONG, ids=lambda v: repr(v)[:12])
def test_wrong_typed_log_fields_do_not_crash_the_charts(tmp_path, value):
    run = tmp_path / "run"
    write_run(run, cuda=True, prediction={"peak_bytes": 2**31, "step_time_s": 1.0})
    fields = ["step", "loss", "tokens_per_s", "val_bpb", "wall_s", "vram_bytes", "vram_peak_bytes",
              "power_w", "energy_kwh", "step_time_s", "host_peak_bytes", "event"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()[:-1]]
    for i, record in enumerate(records):
        record[fields[i % len(fields)]] = value
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert write_report(run).exists()


@pytest.mark.parametrize("value", WRONG, ids=lambda v: repr(v)[:12])
def test_wrong_typed_summary_and_config_fields(tmp_path, value):
    run = tmp_path / "run"
    write_run(run, cuda=True)
    for name in ("summary.json", "config.json"):
        data = json.loads((run / name).read_text())
        for key in [*data, "prediction", "energy_sources", "energy_uncounted_s", "stated_power_w", "currency",
                    "cost", "wall_s", "device"]:
            data[key] = value
        (run / name).write_text(json.dumps(data))
    assert write_report(run).exists()
    for name in ("summary.json", "config.json"):
        data = json.loads((run / name).read_text())
        data["prediction"] = {"peak_bytes": value, "peak_allocated_bytes": value, "step_time_s": value,
                              "tokens_per_s": value}
        data["train"] = {"total_batch": value, "device": value}
        data["recipe"] = {"name": value}
        (run / name).write_text(json.dumps(data))
    assert write_report(run).exists()


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b"3", b"null", b"{}", b"\xff\xfe\x00", b""])
def test_malformed_summary_and_config(tmp_path, content):
    write_run(tmp_path / "run", cuda=True)
    (tmp_path / "run" / "summary.json").write_bytes(content)
    (tmp_path / "run" / "config.json").write_bytes(content)
    assert write_report(tmp_path / "run").exists()


def test_out_that_is_a_file_or_under_a_file(tmp_path):
    write_run(tmp_path / "run", cuda=False)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert str(tmp_path / "file") in one_line_error(tmp_path / "run", out)
    assert (tmp_path / "file").read_text() == "x"


def test_missing_run_or_log(tmp_path):
    one_line_error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "log.jsonl" in one_line_error(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    one_line_error(tmp_path / "afile")
    (tmp_path / "dirlog" / "log.jsonl").mkdir(parents=True)
    one_line_error(tmp_path / "dirlog")
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "empty" / "report").exists()


def test_the_report_command_says_when_a_run_is_not_finished(tmp_path, capsys):
    from onecard.cli import main
    write_run(tmp_path / "done", cuda=False)
    assert main(["report", str(tmp_path / "done")]) == 0
    said = capsys.readouterr().out
    assert "status:" not in said and "note: 1 line of log.jsonl was cut short or is not a JSON object" in said
    write_run(tmp_path / "killed", cuda=False)
    (tmp_path / "killed" / "summary.json").unlink()  # killed before its first checkpoint
    assert main(["report", str(tmp_path / "killed")]) == 0
    assert ("status: running, or stopped without writing its summary (the log reaches step 20; no summary.json"
            in capsys.readouterr().out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty")]) == 0
    assert "note: no summary.json and no step in log.jsonl" in capsys.readouterr().out


def test_a_folder_of_runs_names_the_newest_run_in_it(tmp_path, capsys):
    from onecard.cli import main

    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "log.jsonl").write_text("")
    os.utime(tmp_path / "runs" / "b", (2e9, 2e9))  # b is the newer, whatever order they were made in
    assert main(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs'} holds 2 of them, the newest {tmp_path / 'runs' / 'b'}" in err


def test_a_long_log_is_read_in_little_more_memory_than_its_size(tmp_path):
    """A 70,000-step log (34 MB) took 220 MB to read: the whole file, its lines, and every line's own copy
    of some twenty field names. Read line by line with one copy of each name, it takes 64 MB; here,
    a log of short numbers (more numbers to a byte) stays under three times its size (seven before)."""
    import tracemalloc

    from onecard.report import read_log

    run = tmp_path / "run"
    write_run(run, cuda=False)
    line = json.dumps(json.loads((run / "log.jsonl").read_text().splitlines()[5]))
    (run / "log.jsonl").write_text((line + "\n") * 5000)
    size = (run / "log.jsonl").stat().st_size
    tracemalloc.start()
    try:
        log = read_log(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(log.records) == 5000 and peak < 3 * size, (peak, size)
