"""`onecard report RUN_DIR`: a run's log drawn as PNG files and one self-contained HTML page.

Each chart shows one measurement against steps (left) and against run time (right, in seconds, minutes,
hours or days, whichever the run spans at least two of):
training loss, validation bits per byte, tokens/s, memory, power and cumulative energy. Where
the run was given the planner's prediction (config.json / summary.json "prediction"), the
predicted peak memory and throughput are drawn as dashed lines beside the measurement. A
measurement the run could not take (VRAM and power on the CPU, say) gets a chart that says so. A long
run's line is the mean of each run of consecutive steps, over a band from their lowest to highest value.

Where `onecard eval` has measured the model (RUN_DIR/eval.json), the page and the command's output
carry a report card: one row for the base run and one for its SFT run (found through the SFT run's
init_from), with validation bits per byte, CORE, ARC-E, ARC-C, MMLU, GSM8K, HumanEval and ChatCORE, the
time, energy and cost of each stage, and GPT-2 1.5B's CORE as the reference line. Where it holds nothing
the card shows, both say so from what the file holds.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from onecard.args import text_arg
from onecard.errors import UsageError
from onecard.report_card import card_html, card_text, not_on_card, report_card
from onecard.run import compare_rows, read_json
from onecard.units import format_duration, plausible_number, quantity

GiB = 2**30
BINS = 400  # about a panel's width in pixels: more points than that would draw a solid band


class Log(NamedTuple):
    records: list[dict]  # step and evaluation lines
    events: list[dict]  # lines with an "event" (start, stop, resume, checkpoint)
    skipped: int  # lines that are not a JSON object: cut short by a crash, or damaged


def pyplot():
    """matplotlib.pyplot drawing to files (no display), imported only when a report is drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("onecard report draws with matplotlib, which is not installed here: "
                         "pip install matplotlib") from None
    return plt


def read_log(run_dir: Path) -> Log:
    """The lines of log.jsonl; a line that is not a JSON object (cut short, damaged) is counted and skipped."""
    path = run_dir / "log.jsonl"
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise UsageError(f"{run_dir} {what}: give an onecard run directory")
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        runs = [p for p in run_dir.iterdir() if (p / "log.jsonl").is_file()]  # `onecard report runs`
        newest = max(runs, key=lambda p: p.stat().st_mtime) if runs else None
        inside = f"; {run_dir} holds {len(runs)} of them, the newest {newest}" if runs else ""
        raise UsageError(f"{path} {what}: give an onecard run directory (one with a log.jsonl){inside}")
    records, events, skipped, names = [], [], 0, {}
    try:
        with path.open("rb") as f:  # line by line: a months-long run's log is large
            for line in (part for chunk in f for part in chunk.splitlines()):
                if not line.strip():
                    continue
                try:  # undecodable bytes become U+FFFD, so such a line fails here as bad JSON
                    record = json.loads(line.decode("utf-8", errors="replace"))
                except (ValueError, RecursionError):
                    record = None
                if not isinstance(record, dict):
                    skipped += 1
                    continue
                # json.loads makes each line's field names anew: one copy of each more than halves a long log's memory
                record = {names.setdefault(k, k): v for k, v in record.items()}
                (events if "event" in record else records).append(record)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    return Log(records, events, skipped)


def total_batch(config: dict) -> int | None:
    value = plausible_number(as_dict(config.get("train")).get("total_batch"))
    return int(value) if value else None


def as_dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


# Each chart: file name, title, y label, and how to get (y, x) points and predicted y from the data.
def series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float], list[float]]:
    """Steps, seconds of run time and values of the records where step and `key` are numbers."""
    steps, seconds, values = [], [], []
    for record in records:
        step, value = plausible_number(record.get("step")), plausible_number(record.get(key))
        if step is None or value is None:
            continue
        wall = plausible_number(record.get("wall_s", 0.0))
        steps.append(step)
        seconds.append(math.nan if wall is None else wall)
        values.append(value / scale)
    return steps, seconds, values


def time_unit(seconds: float) -> tuple[float, str]:
    """(seconds in the unit, its name): the largest unit of which `seconds` holds at least two, so that a
    minute's run is not drawn over 0.0003 hours nor a month's over 700."""
    return next(((size, name) for size, name in ((86400, "days"), (3600, "hours"), (60, "minutes"))
                 if seconds >= 2 * size), (1, "seconds"))


def binned(xs: list[float], values: list[float], size: int) -> tuple[np.ndarray, ...]:
    """Mean x, and mean, lowest and highest value, of each `size` consecutive points (the last run may be
    shorter): every raw value lies inside its run's lowest to highest."""
    x, y = np.asarray(xs, dtype=float), np.asarray(values, dtype=float)
    starts = np.arange(0, len(y), size)
    count = np.diff(np.append(starts, len(y)))
    return (np.add.reduceat(x, starts) / count, np.add.reduceat(y, starts) / count,
            np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts))


def draw(path: Path, title: str, ylabel: str, lines: list[tuple[str, tuple]], predicted: float | None,
         missing: str, per: str = "step") -> str:
    """One figure, two panels (against steps, against run time), PNG. A line of more than BINS points is drawn
    as the mean of each run of consecutive points with a band from their lowest to their highest value;
    returns what was averaged ('' where nothing was), which the legend says too."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    averaged = ""
    in_unit, unit = time_unit(max((s for _, (_, seconds, _) in lines for s in seconds if s == s), default=0.0))
    for ax, xlabel, which in ((axes[0], "step", 0), (axes[1], f"{unit} of run time", 1)):
        drawn = False
        for label, (steps, seconds, values) in lines:
            if not values:
                continue
            xs = steps if which == 0 else [s / in_unit for s in seconds]
            size = math.ceil(len(values) / BINS)
            if size == 1:
                ax.plot(xs, values, label=label, linewidth=1.2, marker="o" if len(values) < 30 else None,
                        markersize=3)
            else:
                averaged = f"line: mean of each {quantity(size, per)}; band: their lowest to highest value"
                x, mean, low, high = binned(xs, values, size)
                (line,) = ax.plot(x, mean, label=f"{label}: mean of each {quantity(size, per)}", linewidth=1.2)
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.3, linewidth=0,
                                label=f"{label}: lowest to highest of each {quantity(size, per)}")
            drawn = True
        if predicted is not None:
            ax.axhline(predicted, color="gray", linestyle="--", linewidth=1, label="planner's prediction")
        if not drawn:
            ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if drawn and (len(lines) > 1 or predicted is not None or averaged):
            ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return averaged


def predicted_peak(prediction: dict) -> float | None:
    return plausible_number(prediction.get("peak_allocated_bytes")) or plausible_number(prediction.get("peak_bytes"))


def make_folder(out: Path) -> None:
    """Create the report folder, or say in one line why it cannot be made."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot put the report in {out}: {blocker} is a file, not a folder; give --out a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the report folder {out}: {e.strerror or e}") from None


def write_report(run_dir: Path, out: Path | None = None, log: Log | None = None) -> Path:
    """Draw the charts and the HTML page (from `log`, if already read); returns the page's path."""
    pyplot()  # a missing matplotlib is said before anything is written
    log = read_log(run_dir) if log is None else log
    config = read_json(run_dir / "config.json")
    summary = read_json(run_dir / "summary.json")
    prediction = as_dict(summary.get("prediction")) or as_dict(config.get("prediction"))
    out = out or run_dir / "report"
    make_folder(out)
    try:
        images = []
        for title, name, ylabel, lines, predicted, missing, per in charts(log, config, summary, prediction):
            averaged = draw(out / name, title, ylabel, lines, predicted, missing, per)
            alt = f"{title} ({ylabel}) against step and run time" + (f"; {averaged}" if averaged else "")
            images.append((alt, out / name))
        page = out / "report.html"
        steps = [r for r in log.records if "loss" in r]
        page.write_text(render_html(run_dir, config, summary, log, images,
                                    compare_rows(prediction, summary, steps, total_batch(config)) if prediction
                                    else [], card_html(report_card(run_dir), run_dir)), encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write the report in {out}: {e.strerror or e}") from None
    return page


def charts(log: Log, config: dict, summary: dict, prediction: dict) -> list[tuple]:
    """(title, file name, y label, lines, predicted y or None, what to say when there is nothing, what one
    point is)."""
    steps = [r for r in log.records if "loss" in r]
    train = as_dict(config.get("train"))
    on_cpu = summary.get("device", train.get("device")) == "cpu"
    total_batch = plausible_number(train.get("total_batch"))
    predicted_tps = plausible_number(prediction.get("tokens_per_s"))
    step_time = plausible_number(prediction.get("step_time_s"))
    if predicted_tps is None and step_time and total_batch:
        predicted_tps = total_batch / step_time
    peak = predicted_peak(prediction)
    memory_lines = [("VRAM allocated", series(steps, "vram_bytes", GiB)),
                    ("VRAM peak", series(steps, "vram_peak_bytes", GiB))]
    memory = "memory"
    if on_cpu:  # one line has no legend: the title says what it is
        memory, memory_lines = "memory: host peak (resident)", [("host", series(steps, "host_peak_bytes", GiB))]
    estimated = " (estimated from --power)" if summary.get("stated_power_w") else ""
    no_power = "no power reading: no NVML and no --power"
    return [
        ("training loss", "loss.png", "loss (nats)", [("loss", series(steps, "loss"))], None,
         "no training steps yet", "step"),
        ("validation bits per byte", "val_bpb.png", "bits per byte", [("val", series(log.records, "val_bpb"))],
         None, "no evaluation yet", "evaluation"),
        ("throughput", "tokens_per_s.png", "tokens/s", [("tokens/s", series(steps, "tokens_per_s"))],
         predicted_tps, "no training steps yet", "step"),
        (memory, "memory.png", "GiB", memory_lines, None if peak is None else peak / GiB, "not measured", "step"),
        (("power" if on_cpu else "GPU power") + estimated, "power.png", "watts",
         [("power", series(steps, "power_w"))], None, no_power, "step"),
        ("cumulative energy" + estimated, "energy.png", "kWh", [("energy", series(steps, "energy_kwh"))], None,
         no_power, "step"),
    ]


def log_ahead(summary: dict, log: Log) -> dict | None:
    """The log's last training step where the log went further than the summary was written (a session
    that is running, or that ended without writing one: killed, a power cut); else None."""
    last = next((r for r in reversed(log.records) if "loss" in r), {})
    logged, said = plausible_number(last.get("step")), plausible_number(summary.get("step"))
    return last if logged is not None and (said is None or logged > said) else None


def progress_facts(summary: dict, log: Log) -> tuple[str, object, float | None]:
    """(status, step, run time): the summary's, or the log's where it went further."""
    ahead = log_ahead(summary, log)
    if ahead is None:
        return summary.get("status") or "—", summary.get("step", "—"), plausible_number(summary.get("wall_s"))
    logged = int(ahead["step"])
    summarized = (f"the summary says {summary['status']} at step {int(plausible_number(summary.get('step')) or 0):,}"
                  if summary.get("status") else "no summary.json, or not a readable one")
    return (f"running, or stopped without writing its summary (the log reaches step {logged:,}; {summarized})",
            logged, plausible_number(ahead.get("wall_s")))


def caught_up(summary: dict, log: Log) -> dict:
    """The summary with the log's latest counts (tokens, run time, energy, cost, mean tokens/s) where the
    log went further. Its step and status stay the summary's, which progress_facts sets beside the log's."""
    ahead = log_ahead(summary, log)
    if ahead is None:
        return summary
    out = dict(summary)
    for key in ("tokens", "wall_s", "energy_kwh", "cost"):
        if plausible_number(ahead.get(key)) is not None:
            out[key] = ahead[key]
    tokens, wall = plausible_number(out.get("tokens")), plausible_number(out.get("wall_s"))
    out["tokens_per_s_mean"] = tokens / wall if tokens is not None and wall else None
    return out


def bpb_span(summary: dict, log: Log) -> tuple[float | None, float | None]:
    """Validation bits per byte (first, latest): the summary's, each taken from the log where the summary
    lacks it or the log went further."""
    logged = [v for v in (plausible_number(r.get("val_bpb")) for r in log.records) if v is not None]
    start, end = plausible_number(summary.get("val_bpb_start")), plausible_number(summary.get("val_bpb_end"))
    if logged and start is None:
        start = logged[0]
    if logged and (end is None or log_ahead(summary, log) is not None):
        end = logged[-1]
    return start, end


def status_line(run_dir: Path, log: Log) -> str:
    """For the terminal: the run's state where it is not a finished run ('' for one)."""
    summary = read_json(run_dir / "summary.json")
    status, step, _ = progress_facts(summary, log)
    if status == "finished":
        return ""
    if status == "—":
        return ("note: no summary.json and no step in log.jsonl: the run has not taken a step yet, or its files are "
                "damaged")
    steps = summary.get("steps", as_dict(read_json(run_dir / "config.json").get("train")).get("steps", "?"))
    return f"status: {status}, step {step} of {steps}"


def fixed(value: float | None, spec: str) -> str:
    """A number as the terminal writes it (bits per byte to 4 decimals, as training and the card; rates
    grouped), so that the page and the terminal show the same figures."""
    return "—" if value is None else format(value, spec)


def render_html(run_dir: Path, config: dict, summary: dict, log: Log, images: list[tuple[str, Path]],
                predicted_rows: list[tuple[str, str, str]], card: str = "") -> str:
    """One page with everything inside it: the PNGs (each with its alt text) are embedded as base64."""
    summary = caught_up(summary, log)

    def fmt(value, unit: str = "", digits: int = 4) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.{digits}g}{unit}"
        return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"

    currency, cost = summary.get("currency", ""), plausible_number(summary.get("cost"))
    energy = plausible_number(summary.get("energy_kwh"))
    sources = summary.get("energy_sources")
    energy_note = ""
    if summary.get("stated_power_w") or (isinstance(sources, list) and "estimate" in sources):
        energy_note = " (estimate from a stated power)"
    uncounted = plausible_number(summary.get("energy_uncounted_s"))
    if uncounted:
        energy_note += f", {format_duration(uncounted)} not counted (no reading)"
    status, step, wall = progress_facts(summary, log)
    facts = [
        ("status", status),
        ("step", f"{step} of {summary.get('steps', as_dict(config.get('train')).get('steps', '—'))}"),
        ("model", json.dumps(config.get("model_config", {}))),
        ("recipe", as_dict(config.get("recipe")).get("name")),
        ("device", f"{summary.get('device')} {summary.get('gpu') or ''}".strip()
         + (f" x {summary['ranks']} ranks" if isinstance(summary.get("ranks"), int) and summary["ranks"] > 1 else "")),
        ("tokens", fmt(summary.get("tokens"))),
        ("run time", "—" if wall is None else format_duration(wall)),
        ("tokens/s (mean over run time)", fixed(plausible_number(summary.get("tokens_per_s_mean")), ",.0f")),
        ("validation bits per byte", " → ".join(fixed(v, ".4f") for v in bpb_span(summary, log))),
        ("skipped steps (non-finite)", fmt(summary.get("skipped_steps"))),
        ("energy", (fmt(energy, " kWh") if energy is not None else "not measured") + energy_note),
        ("cost", "—" if cost is None else f"{cost:,.2f} {currency}".strip()),  # as the card and the progress line
        ("last checkpoint", summary.get("last_checkpoint")),
    ]
    if log.skipped:
        facts.append(("skipped log lines (cut short or not a JSON object)", fmt(log.skipped)))
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    predicted = ""
    if predicted_rows:
        body = "\n".join(f"<tr><td>{html.escape(q)}</td><td>{html.escape(p)}</td><td>{html.escape(m)}</td></tr>"
                         for q, p, m in predicted_rows)
        predicted = (f"<h2>Planner's prediction and measurement</h2>\n<table><tr><th></th><th>predicted</th>"
                     f"<th>measured</th></tr>\n{body}</table>")
    sessions = sum(1 for e in log.events if e["event"] in ("start", "resume"))
    figures = "\n".join(
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"></figure>' for alt, path in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>onecard run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}}
th{{text-align:left;padding-right:1em}} td{{padding-right:1em}} h1,td{{overflow-wrap:break-word}}
table,figure{{overflow-x:auto}} table{{display:block}} figure{{margin:1em 0}}
img{{max-width:100%;min-width:720px}}</style></head>
<body><h1>onecard run {html.escape(str(run_dir))}</h1>
<table>
{rows}
<tr><th>sessions</th><td>{sessions}</td></tr>
</table>
{card}
{predicted}
{figures}
</body></html>
"""


# ---------------------------------------------------------------- the command

def add_arguments(p) -> None:
    p.add_argument("run_dir", type=text_arg, help="an onecard run directory (with log.jsonl)")
    p.add_argument("--out", type=text_arg, help="where the PNG files and report.html go (default RUN_DIR/report)")


def run(args) -> int:
    log = read_log(Path(args.run_dir))  # read once: a months-long run's log is large
    page = write_report(Path(args.run_dir), Path(args.out) if args.out else None, log)
    card = report_card(Path(args.run_dir))
    print(card_text(card) if card else not_on_card(Path(args.run_dir)))
    print(f"report written: {page} (and the PNG files beside it)")
    for line in (status_line(Path(args.run_dir), log), skipped_line(log.skipped)):
        if line:
            print(line)
    return 0


def skipped_line(skipped: int) -> str:
    if skipped == 1:
        return "note: 1 line of log.jsonl was cut short or is not a JSON object: the report leaves it out"
    return (f"note: {skipped:,} lines of log.jsonl were cut short or are not JSON objects: the report leaves them out"
            if skipped else "")
