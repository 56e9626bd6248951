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


def load_script(name: str):
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_trace_finds_what_is_alive_at_the_peak():
    """A hand-made trace: 100 allocated before it began and freed in it (not counted), then
    a (40) and b (30) alive together, a freed, c (50) at the peak with b: 80 bytes, b and c."""
    trace = load_script("memory_trace")
    frames = [{"filename": "/x/torch/autograd/graph.py", "line": 7, "name": "backward"},
              {"filename": "/x/onecard/model.py", "line": 99, "name": "forward"}]
    events = [
        {"action": "free_requested", "addr": 9, "size": 100},
        {"action": "free_completed", "addr": 9, "size": 100},
        {"action": "alloc", "addr": 1, "size": 40, "frames": frames},
        {"action": "alloc", "addr": 2, "size": 30, "frames": frames[:1]},
        {"action": "free_requested", "addr": 1, "size": 40},
        {"action": "free_completed", "addr": 1, "size": 40},
        {"action": "alloc", "addr": 3, "size": 50, "frames": frames},
        {"action": "free_completed", "addr": 3, "size": 50},
        {"action": "alloc", "addr": 4, "size": 10, "frames": []},
    ]
    peak, alive = trace.live_at_peak(events)
    assert peak == 80 and sorted(e["addr"] for e in alive) == [2, 3]
    assert trace.by_site(alive) == [("onecard/model.py:99 forward", 50, 1),
                                    ("torch/autograd/graph.py:7 backward", 30, 1)]
    assert trace.site(events[-1]) == "(no frames recorded)"
