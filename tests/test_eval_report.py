"""`onecard report` carries the report card: BASE and SFT rows (the SFT run found through init_from,
from either side), validation bits per byte, CORE and the chat tasks, ChatCORE, each stage's time, energy
and cost, and GPT-2's CORE as the reference line; without a card it says what eval.json holds."""

import json
from pathlib import Path

from onecard.cli import main
from onecard.eval_results import CARD, merge
from onecard.report import write_report
from onecard.report_card import card_text, report_card
from tests.serve_helpers import TINY

COLUMN = {key: i for i, (_, key) in enumerate(CARD)}


def make_run(path, stage, init_from=None, energy=None, cost=None):
    path.mkdir()
    (path / "log.jsonl").write_text('{"step": 1, "loss": 3.0, "wall_s": 1.0}\n')
    (path / "config.json").write_text(json.dumps({"stage": stage, "init_from": init_from, "train": {}}))
    (path / "summary.json").write_text(json.dumps({"status": "finished", "wall_s": 7200.0, "energy_kwh": energy,
                                                   "cost": cost, "currency": "EUR"}))
    return path


def test_card_rows_from_both_sides(tmp_path, capsys):
    base = make_run(tmp_path / "base", "pretrain", energy=1.5, cost=0.45)
    sft = make_run(tmp_path / "base-sft", "sft", init_from=str(base), energy=0.1, cost=0.03)
    make_run(tmp_path / "unrelated-sft", "sft", init_from=str(tmp_path / "elsewhere"))
    merge(base, {"core": {"value": 0.0123, "max_per_task": None}, "bpb": {"value": 1.2}})
    merge(sft, {"arc-easy": {"value": 0.31}, "arc-challenge": {"value": 0.26}, "mmlu": {"value": 0.27},
                "gsm8k": {"value": 0.02, "max_per_task": 50}, "humaneval": {"value": 0.0}})
    for start in (base, sft):
        rows = report_card(start)
        assert [r.stage for r in rows] == ["BASE", "SFT", "GPT-2 1.5B (reference)"]
        assert rows[0].cells[COLUMN["core"]] == (0.0123, False) and rows[1].cells[COLUMN["gsm8k"]] == (0.02, True)
        assert rows[0].cells[COLUMN["bpb"]] == (1.2, False)
        assert rows[2].cells[COLUMN["core"]][0] == 0.256525
    chatcore = json.loads((sft / "eval.json").read_text())["chatcore"]
    assert chatcore["partial"] and chatcore["value"] > 0
    text = card_text(report_card(base))
    assert "BASE CORE 0.0123 does not beat GPT-2 1.5B's 0.2565" in text
    assert "0.0200*" in text and "* on --max-per-task examples only" in text and "1.5 kWh" in text
    assert "0.45 EUR" in text and "2 h 00 min" in text
    page = write_report(sft).read_text()
    assert "<h2>Evaluation</h2>" in page and "<th>SFT</th>" in page and "<th>GPT-2 1.5B (reference)</th>" in page
    assert main(["report", str(base)]) == 0
    out = capsys.readouterr().out
    assert "ChatCORE" in out and "does not beat GPT-2" in out


def test_the_sft_row_is_found_from_inside_the_base_run(tmp_path, monkeypatch):
    base = make_run(tmp_path / "base", "pretrain")
    make_run(tmp_path / "base-sft", "sft", init_from=str(base))
    merge(base, {"bpb": {"value": 1.2}})
    monkeypatch.chdir(base)  # `onecard report .`: the parent of "." is "." itself
    assert [r.stage for r in report_card(Path("."))] == ["BASE", "SFT", "GPT-2 1.5B (reference)"]


def test_no_card_before_an_evaluation_and_a_damaged_file(tmp_path):
    base = make_run(tmp_path / "base", "pretrain")
    assert report_card(base) == []
    assert f"Not evaluated yet: onecard eval {base}" in write_report(base).read_text()
    (base / "eval.json").write_text("{not json")
    assert report_card(base) == []
    (base / "eval.json").write_text(json.dumps({"tasks": {"core": {"value": "NaN"}, "mmlu": {"value": 1e999}}}))
    assert report_card(base) == []  # nothing it can show


def test_a_bits_per_byte_evaluation_reaches_the_card(tmp_path, capsys, monkeypatch):
    import onecard.core_metric

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY]) == 0
    capsys.readouterr()
    # --max-per-task bounds tasks' examples, not bpb's tokens: the cell is not marked partial
    monkeypatch.setattr(onecard.core_metric, "DEFAULT_BUNDLE", tmp_path / "no-bundle")
    assert main(["eval", str(run), "--bpb-tokens", "64", "--max-per-task", "2"]) == 0
    assert "note: no CORE score: the eval bundle is not at hand" in capsys.readouterr().out  # not left out unsaid
    record = json.loads((run / "eval.json").read_text())
    bpb = record["tasks"]["bpb"]["value"]
    assert record["weights"] == f"step {json.loads((run / 'config.json').read_text())['results']['steps']}"
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    base = next(line for line in out.splitlines() if line.startswith("BASE"))
    assert "val bpb" in out and f"{bpb:.4f} " in base and "*" not in out and "Not evaluated" not in out
    assert f"<td>{bpb:.4f}</td>" in (run / "report" / "report.html").read_text()


def test_without_a_card_it_says_what_eval_json_holds(tmp_path, capsys):
    base = make_run(tmp_path / "base", "pretrain")
    merge(base, {"lm-eval:hellaswag": {"value": 0.3}})  # a task the card has no column for
    assert report_card(base) == []
    assert main(["report", str(base)]) == 0
    out = capsys.readouterr().out
    assert f"{base / 'eval.json'} holds lm-eval:hellaswag" in out and "Not evaluated" not in out
    assert "holds lm-eval:hellaswag" in write_report(base).read_text()


def test_scores_of_other_weights_in_the_folder_are_dropped_not_kept_beside(tmp_path):
    """A nanochat checkpoint folder that gains a later model_*.pt: eval.json held the old step's scores,
    and a new task's score was set beside them as if one model had scored both."""
    entry = {"metric": "bits per byte", "value": 1.5, "examples": 10}
    merge(tmp_path, {"bpb": entry, "mmlu": {**entry, "metric": "accuracy", "value": 0.3}}, "step 5")
    assert set(merge(tmp_path, {"bpb": entry}, "step 5")["tasks"]) == {"bpb", "mmlu"}  # same weights: kept
    record = merge(tmp_path, {"bpb": {**entry, "value": 1.2}}, "step 7")
    assert record["weights"] == "step 7" and set(record["tasks"]) == {"bpb"}
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"]["bpb"]["value"] == 1.2
    (tmp_path / "eval.json").write_text(json.dumps({"format": 1, "tasks": {"mmlu": entry}}))  # an older file
    assert set(merge(tmp_path, {"bpb": entry}, "step 7")["tasks"]) == {"bpb", "mmlu"}


def test_the_weights_scored_are_named_only_where_a_step_says_which():
    """A checkpoint folder's config.json has no results yet: not every such folder named 'step None'."""
    from types import SimpleNamespace

    from onecard.eval_results import weights_scored

    assert weights_scored({"layout": "nanochat", "step": 7}) == "step 7"
    assert weights_scored({"layout": "onecard", "config": SimpleNamespace(results={"steps": 30})}) == "step 30"
    assert weights_scored({"layout": "onecard", "config": SimpleNamespace(results=None)}) is None
    assert weights_scored({"layout": "transformers"}) is None
