"""`onecard report RUN_DIR`: a run's log drawn as PNG files and one self-contained HTML page.

Each chart shows one measurement against steps (left) and against hours of run time (right):
training loss, validation bits per byte, tokens/s, memory, power and cumulative energy. Where
the run was given the planner's prediction (config.json / summary.json "prediction"), the
predicted peak memory and throughput are drawn as dashed lines beside the measurement. A
measurement the run could not take (VRAM and power on the CPU, say) gets a chart that says so.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from pathlib import Path

from onecard.errors import UsageError
from onecard.meters import format_duration

GiB = 2**30


def read_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step lines, event lines) of log.jsonl; a line cut short by a crash is skipped."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        raise UsageError(f"{path} does not exist: give an onecard run directory")
    steps, events = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        (events if "event" in record else steps).append(record)
    return steps, events


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# Each chart: file name, title, y label, and how to get (y, x) points and predicted y from the data.
def series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    """Steps, hours and values of the records that have `key` (non-null)."""
    kept = [r for r in records if r.get(key) is not None]
    return ([r["step"] for r in kept], [r.get("wall_s", 0.0) / 3600 for r in kept],
            [r[key] / scale for r in kept])


def draw(path: Path, title: str, ylabel: str, lines: list[tuple[str, tuple]], predicted: float | None,
         missing: str) -> None:
    """One figure, two panels (against steps, against hours), PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, xlabel, which in ((axes[0], "step", 0), (axes[1], "hours of run time", 1)):
        drawn = False
        for label, (steps, hours, values) in lines:
            if values:
                ax.plot(steps if which == 0 else hours, values, label=label, linewidth=1.2,
                        marker="o" if len(values) < 30 else None, markersize=3)
                drawn = True
        if predicted is not None:
            ax.axhline(predicted, color="gray", linestyle="--", linewidth=1, label="planner's prediction")
        if not drawn:
            ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if drawn and (len(lines) > 1 or predicted is not None):
            ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measured_vs_predicted(records: list[dict], summary: dict, prediction: dict) -> list[tuple[str, str, str]]:
    """Rows (quantity, predicted, measured) for what the planner forecast."""
    rows = []
    if prediction.get("peak_allocated_bytes") or prediction.get("peak_bytes"):
        predicted = prediction.get("peak_allocated_bytes") or prediction["peak_bytes"]
        measured = summary.get("vram_peak_bytes")
        rows.append(("peak memory allocated (GiB)", f"{predicted / GiB:.2f}",
                     "—" if measured is None else f"{measured / GiB:.2f}"))
    if prediction.get("step_time_s"):
        times = [r["step_time_s"] for r in records if r.get("step_time_s")]
        rows.append(("step time (s, median)", f"{prediction['step_time_s']:.3f}",
                     f"{statistics.median(times):.3f}" if times else "—"))
    return rows


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the charts and the HTML page; returns the page's path."""
    records, events = read_log(run_dir)
    config = read_json(run_dir / "config.json")
    summary = read_json(run_dir / "summary.json")
    prediction = summary.get("prediction") or config.get("prediction") or {}
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r for r in records if "loss" in r]
    on_cpu = summary.get("device", config.get("train", {}).get("device")) == "cpu"
    total_batch = config.get("train", {}).get("total_batch")

    predicted_tps = prediction.get("tokens_per_s")
    if predicted_tps is None and prediction.get("step_time_s") and total_batch:
        predicted_tps = total_batch / prediction["step_time_s"]
    predicted_peak = prediction.get("peak_allocated_bytes") or prediction.get("peak_bytes")
    memory_lines = [("VRAM allocated", series(steps, "vram_bytes", GiB)),
                    ("VRAM peak", series(steps, "vram_peak_bytes", GiB))]
    if on_cpu:
        memory_lines = [("host peak (resident)", series(steps, "host_peak_bytes", GiB))]
    estimated = " (estimated from --power)" if summary.get("stated_power_w") else ""
    no_power = "no power reading: no NVML and no --power"
    charts = [
        ("loss.png", "training loss", "loss (nats)", [("loss", series(steps, "loss"))], None,
         "no training steps yet"),
        ("val_bpb.png", "validation bits per byte", "bits per byte", [("val", series(records, "val_bpb"))], None,
         "no evaluation yet"),
        ("tokens_per_s.png", "throughput", "tokens/s", [("tokens/s", series(steps, "tokens_per_s"))],
         predicted_tps, "no training steps yet"),
        ("memory.png", "memory", "GiB", memory_lines, None if predicted_peak is None else predicted_peak / GiB,
         "not measured"),
        ("power.png", "GPU power" + estimated, "watts", [("power", series(steps, "power_w"))], None, no_power),
        ("energy.png", "cumulative energy" + estimated, "kWh", [("energy", series(steps, "energy_kwh"))], None,
         no_power),
    ]
    images = []
    for name, title, ylabel, lines, predicted, missing in charts:
        draw(out / name, title, ylabel, lines, predicted, missing)
        images.append((title, out / name))

    page = out / "report.html"
    page.write_text(render_html(run_dir, config, summary, events, images,
                                measured_vs_predicted(steps, summary, prediction)))
    return page


def render_html(run_dir: Path, config: dict, summary: dict, events: list[dict], images: list[tuple[str, Path]],
                predicted_rows: list[tuple[str, str, str]]) -> str:
    """One page with everything inside it: the PNGs are embedded as base64."""
    def fmt(value, unit: str = "", digits: int = 4) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.{digits}g}{unit}"
        return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"

    currency = summary.get("currency", "")
    energy = summary.get("energy_kwh")
    energy_note = ""
    if summary.get("stated_power_w") or "estimate" in summary.get("energy_sources", []):
        energy_note = " (estimate from a stated power)"
    if summary.get("energy_uncounted_s"):
        energy_note += f", {format_duration(summary['energy_uncounted_s'])} not counted (no reading)"
    facts = [
        ("status", summary.get("status")),
        ("step", f"{summary.get('step', '—')} of {summary.get('steps', '—')}"),
        ("model", json.dumps(config.get("model_config", {}))),
        ("recipe", config.get("recipe", {}).get("name")),
        ("device", f"{summary.get('device')} {summary.get('gpu') or ''}".strip()),
        ("tokens", fmt(summary.get("tokens"))),
        ("run time", format_duration(summary.get("wall_s", 0))),
        ("tokens/s (mean over run time)", fmt(summary.get("tokens_per_s_mean"), digits=5)),
        ("validation bits per byte", f"{fmt(summary.get('val_bpb_start'))} → {fmt(summary.get('val_bpb_end'))}"),
        ("skipped steps (non-finite)", fmt(summary.get("skipped_steps"))),
        ("energy", (fmt(energy, " kWh") if energy is not None else "not measured") + energy_note),
        ("cost", fmt(summary.get("cost"), f" {currency}")),
        ("last checkpoint", summary.get("last_checkpoint")),
    ]
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    predicted = ""
    if predicted_rows:
        body = "\n".join(f"<tr><td>{html.escape(q)}</td><td>{p}</td><td>{m}</td></tr>" for q, p, m in predicted_rows)
        predicted = (f"<h2>Planner's prediction and measurement</h2>\n<table><tr><th></th><th>predicted</th>"
                     f"<th>measured</th></tr>\n{body}</table>")
    sessions = sum(1 for e in events if e["event"] in ("start", "resume"))
    figures = "\n".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"></figure>' for title, path in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>onecard run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto}} th{{text-align:left;padding-right:1em}}
td{{padding-right:1em}} img{{max-width:100%}}</style></head>
<body><h1>onecard run {html.escape(str(run_dir))}</h1>
<table>
{rows}
<tr><th>sessions</th><td>{sessions}</td></tr>
</table>
{predicted}
{figures}
</body></html>
"""
