"""The GPU benchmark scripts run (a CPU smoke run of their loop), so that they work when a card is lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_gpu_smoke_run_writes_its_record(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipes_gpu.py"), "--device", "cpu",
                           "--depths", "1", "--seq-len", "32", "--vocab-size", "256", "--caps", "0",
                           "--recipes", "lean", "offload-max", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [path] = tmp_path.glob("recipes_gpu_*.json")
    record = json.loads(path.read_text())
    assert record["device"] == "cpu (smoke run)" and record["commit"] and record["command"]
    assert [r["recipe"]["name"] for r in record["rows"]] == ["lean", "offload-max"]
    for row in record["rows"]:
        assert row["outcome"] == "ran" and row["tokens_per_s"] > 0 and row["mfu_hardware"] >= row["mfu_model"] > 0
        assert row["predicted_allocated"] <= row["predicted_total"]
    assert "| d1 | whole | lean |" in done.stdout


def test_vs_nanochat_cpu_run_side_by_side(tmp_path):
    """nanochat's own step and onecard's baseline on the same weights and batch: both run, the record
    holds ratios, and eagerly the step's peak memory is nanochat's to within 1 % (a parity check:
    onecard's step keeps only its RNG snapshot more)."""
    from tests.reference import ROOT as REFERENCE
    from tests.reference import nanochat
    nanochat("fae3aca", "gpt")  # skips where the reference copy is absent
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_nanochat.py"), "--device", "cpu",
                           "--rounds", "2", "--warmup", "1", "--recipes", "baseline,lean",
                           "--reference", str(REFERENCE / "nanochat-fae3aca"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [path] = tmp_path.glob("vs_nanochat_cpu_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert list(rows) == ["nanochat", "onecard baseline", "onecard lean"]
    assert all(r["tokens_per_s"] > 0 and r["steps_timed"] == 2 for r in rows.values())
    assert rows["onecard baseline"]["vs_nanochat_memory"] == pytest.approx(1.0, abs=0.01)
    assert rows["onecard lean"]["vs_nanochat_memory"] < 0.8
