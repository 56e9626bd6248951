"""The planner against every GPU step onecard has measured and the published runs its compiled
constants come from (benchmarks/fit_planner.py lists each row; benchmarks/README.md the table).

The issue's target is ±15 % on every measured row. The bounds below are what the planner meets
today, so that a change that makes it worse fails here: rows that keep everything on the card
within 16 % (all but one within 15 %); grads=cpu rows, measured when the trainer still folded
gradients inside backward and whose folding cost differs between d20 and d32 on the same host,
within 40 %. The timing constants are fitted to these very rows, so these bounds guard against
regressions; they do not validate the fit. Only the RTX 4090 run is data the fit did not see. The
memory rows are not fitted: the byte counts come from the model's shapes and recipe layouts.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from onecard.plan.assumptions import DEFAULT

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fit_planner", ROOT / "benchmarks" / "fit_planner.py")
fit_planner = importlib.util.module_from_spec(_spec)
sys.modules["fit_planner"] = fit_planner  # dataclasses look their module up
_spec.loader.exec_module(fit_planner)

ROWS = fit_planner.measured_rows()


def test_every_measured_row_is_read():
    assert len(ROWS) == 17  # the ran rows of benchmarks/results/gpu_session1 and gpu_session2
    assert {r.gpu.key for r in ROWS} == {"h200"}
    assert all(r.step_s > 0 and r.tokens >= 2048 for r in ROWS)


@pytest.mark.parametrize("row", [r for r in ROWS if not r.folded_in_backward], ids=lambda r: r.what)
def test_on_card_rows_within_16_percent(row):
    ratio = fit_planner.predicted_step_s(row, DEFAULT) / row.step_s
    assert abs(ratio - 1) <= 0.16, f"predicted/measured {ratio:.2f}"


def test_most_on_card_rows_meet_the_15_percent_target():
    on_card = [r for r in ROWS if not r.folded_in_backward]
    within = [r for r in on_card if abs(fit_planner.predicted_step_s(r, DEFAULT) / r.step_s - 1) <= 0.15]
    assert len(within) >= len(on_card) - 1


@pytest.mark.parametrize("row", [r for r in ROWS if r.folded_in_backward], ids=lambda r: r.what)
def test_cpu_gradient_rows_within_40_percent(row):
    ratio = fit_planner.predicted_step_s(row, DEFAULT) / row.step_s
    assert abs(math.log(ratio)) <= math.log(1.4), f"predicted/measured {ratio:.2f}"


@pytest.mark.parametrize("what, card, depth, vocab, micro, mfu", fit_planner.PUBLISHED, ids=["d20", "d32"])
def test_published_compiled_runs_within_10_percent(what, card, depth, vocab, micro, mfu):
    assert fit_planner.published_mfu(card, depth, vocab, micro, DEFAULT) == pytest.approx(mfu, rel=0.10)


def test_geforce_compiled_run_is_not_over_predicted():
    """nanoGPT's compiled GPT-2 124M on an RTX 4090 reached 55 % (checked, not fitted): the planner
    stays under it, and within 15 %."""
    [(_, card, mfu)] = fit_planner.CHECKED
    predicted = fit_planner.gpt2_124m_mfu(card, DEFAULT)
    assert mfu == 0.55 and 0.55 * 0.85 <= predicted <= 0.55


def measured_peaks() -> list[tuple[str, float]]:
    """predicted / measured torch.cuda.max_memory_allocated for every row the GPU sessions ran
    (eager) before a grads=cpu row in the same process: those leaked their weights until ca1d5a3
    (benchmarks/README.md), which inflated every later row's peak."""
    from onecard.plan.memory import predict_memory

    ratios = {}
    for row in ROWS:
        if row.leaked or not row.peak_allocated:
            continue
        micro_steps = row.tokens // (row.recipe.micro_batch * row.recipe.seq_len)
        predicted = predict_memory(row.config, row.recipe, micro_steps=micro_steps)
        key = f"d{row.config.n_layer} {row.recipe.name} mb{row.recipe.micro_batch}"
        ratios[key] = predicted.allocated / row.peak_allocated
    return sorted(ratios.items())


def test_peak_memory_against_every_measured_row():
    """The loss's backward frees its logits before a block's backward re-runs it: counting the two
    apart, not summed, is what the measured peaks show; and a recomputed block keeps no bf16 copies
    of fp32 weights. No row is under-predicted by more than 5 % (the planner adds a 10 % allocator
    margin on top), 7 of 14 are within 5 % (4 before both), the median 4.2 % over. Summed, d32 lean
    at micro-batch 1 was 2.3 % over and d20 lean at 32 6.1 %; with the copies, d20 recompute 7.9 %."""
    rows = measured_peaks()
    assert len(rows) == 14
    ratios = sorted(r for _, r in rows)
    assert ratios[0] > 0.95, rows
    assert sum(abs(r - 1) <= 0.05 for r in ratios) >= 7, rows
    assert abs((ratios[6] + ratios[7]) / 2 - 1) <= 0.05, rows
    assert dict(rows)["d32 lean mb1"] == pytest.approx(1.0, abs=0.01)
    assert dict(rows)["d20 lean mb32"] == pytest.approx(1.0, abs=0.01)
    assert dict(rows)["d20 recompute mb32"] == pytest.approx(1.0, abs=0.05)
