"""The GPU benchmark scripts run (a CPU smoke run of their loop), so that they work when a card is lent."""

import json
import subprocess
import sys
from pathlib import Path

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
