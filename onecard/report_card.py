"""The evaluation report card of `onecard report`: one row for the base run and one for its SFT run
(found through the SFT run's init_from), with what `onecard eval` measured (RUN_DIR/eval.json), each
stage's time, energy and cost, and GPT-2 1.5B's CORE as the reference line."""

from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple

from onecard import eval_results
from onecard.run import read_json
from onecard.units import format_duration, plausible_number


class CardRow(NamedTuple):
    stage: str  # BASE, SFT or the reference
    run_dir: Path | None
    cells: list[tuple[float | None, bool]]  # (value, measured on --max-per-task examples only) per column
    wall_s: float | None
    energy_kwh: float | None
    cost: str | None


def stage_runs(run_dir: Path) -> dict[str, Path]:
    """The base and SFT runs of one model: an SFT run names its base in config.json's init_from; a base
    run's SFT is the newest run beside it that names it."""
    config = read_json(run_dir / "config.json")
    if config.get("stage") == "sft":
        found = {"SFT": run_dir}
        base = _existing_run(config.get("init_from"), run_dir)
        return {"BASE": base, **found} if base else found
    sfts = []
    here = run_dir.resolve()  # `onecard report .` inside the run: the parent of "." is "." itself
    try:
        beside = list(here.parent.iterdir())
    except OSError:
        beside = []
    for other in beside:
        theirs = read_json(other / "config.json") if other != here and other.is_dir() else {}
        if theirs.get("stage") == "sft" and _existing_run(theirs.get("init_from"), other) == here:
            sfts.append((other.stat().st_mtime, other))
    return {"BASE": run_dir, **({"SFT": max(sfts)[1]} if sfts else {})}


def _existing_run(named: object, beside: Path) -> Path | None:
    """init_from as written (relative to where onecard ran, or to the run's own folder), if it is a folder."""
    if not isinstance(named, str) or not named:
        return None
    for candidate in (Path(named), beside.parent / Path(named).name):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def report_card(run_dir: Path) -> list[CardRow]:
    """BASE and SFT rows with what `onecard eval` measured and what each stage cost, then GPT-2's line;
    empty when neither run has been evaluated."""
    rows = []
    for stage, path in stage_runs(run_dir).items():
        record, summary = eval_results.read(path), read_json(path / "summary.json")
        cells = [(eval_results.card_value(record, key), eval_results.card_partial(record, key))
                 for _, key in eval_results.CARD]
        cost = plausible_number(summary.get("cost"))
        rows.append(CardRow(stage, path, cells, plausible_number(summary.get("wall_s")),
                            plausible_number(summary.get("energy_kwh")),
                            None if cost is None else f"{cost:.2f} {summary.get('currency', '')}".strip()))
    if not any(value is not None for row in rows for value, _ in row.cells):
        return []
    gpt2 = [(eval_results.GPT2_CORE if key == "core" else None, False) for _, key in eval_results.CARD]
    return rows + [CardRow("GPT-2 1.5B (reference)", None, gpt2, None, None, None)]


def not_on_card(run_dir: Path) -> str:
    """Why there is no card, from what the runs' eval.json files hold: it never asks for the evaluation
    just run when that evaluation wrote only what the card has no column for (--lm-eval) or no number."""
    held = {path: sorted(eval_results.read(path)["tasks"]) for path in stage_runs(run_dir).values()
            if (path / eval_results.FILE).exists()}
    if not held:
        return f"Not evaluated yet: onecard eval {run_dir}"
    said = "; ".join(f"{path / eval_results.FILE} holds {', '.join(names)}" if names else
                     f"{path / eval_results.FILE} holds no result (empty or damaged)" for path, names in held.items())
    columns = ", ".join(heading for heading, _ in eval_results.CARD)
    return f"No score for the report card ({columns}): {said}"


def verdict(rows: list[CardRow]) -> str:
    """Does the model beat GPT-2 on CORE? One line, or '' where CORE was not measured."""
    column = [key for _, key in eval_results.CARD].index("core")
    core = [(row.stage, row.cells[column][0]) for row in rows
            if row.run_dir is not None and row.cells[column][0] is not None]
    if not core:
        return ""
    stage, value = core[0]
    word = "beats" if value > eval_results.GPT2_CORE else "does not beat"
    return f"{stage} CORE {value:.4f} {word} GPT-2 1.5B's {eval_results.GPT2_CORE:.4f}"


def _cell(value: float | None, partial: bool) -> str:
    return "—" if value is None else f"{value:.4f}" + ("*" if partial else "")


def card_text(rows: list[CardRow]) -> str:
    heads = [h for h, _ in eval_results.CARD] + ["time", "energy", "cost"]
    table = [[row.stage, *(_cell(v, p) for v, p in row.cells),
              format_duration(row.wall_s) if row.wall_s is not None else "—",
              f"{row.energy_kwh:.4g} kWh" if row.energy_kwh is not None else "—", row.cost or "—"] for row in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(["", *heads], *table, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in (["", *heads], *table)]
    notes = [verdict(rows)] + (["* on --max-per-task examples only"] if "*" in "".join(lines) else [])
    return "\n".join(lines + [n for n in notes if n])


def card_html(rows: list[CardRow], run_dir: Path) -> str:
    if not rows:
        return f"<h2>Evaluation</h2>\n<p>{html.escape(not_on_card(run_dir))} (see README).</p>"
    heads = "".join(f"<th>{html.escape(h)}</th>" for h, _ in eval_results.CARD)
    body = "\n".join(
        f"<tr><th>{html.escape(row.stage)}</th>" + "".join(f"<td>{html.escape(_cell(v, p))}</td>" for v, p in row.cells)
        + f"<td>{format_duration(row.wall_s) if row.wall_s is not None else '—'}</td>"
        + f"<td>{f'{row.energy_kwh:.4g} kWh' if row.energy_kwh is not None else '—'}</td>"
        + f"<td>{html.escape(row.cost or '—')}</td></tr>" for row in rows)
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in card_text(rows).splitlines()[len(rows) + 1:])
    return (f"<h2>Evaluation</h2>\n<table><tr><th></th>{heads}<th>time</th><th>energy</th><th>cost</th></tr>\n"
            f"{body}</table>\n{notes}")
