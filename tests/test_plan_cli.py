"""`onecard plan` and `onecard bench` from the command line: output, JSON contract, bad input."""

import json

import pytest
import torch

from onecard.cli import main
from onecard.model_config import GPTConfig
from onecard.recipe import NAMED

CONTRACT_MEMORY = {"weights", "grads", "optimizer", "activations", "logits", "other", "total"}


@pytest.fixture(autouse=True)
def no_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("ONECARD_HOME", str(tmp_path / "home"))


def run_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_plan_for_d32_on_a_4070(capsys):
    assert main(["plan", "--model", "d32", "--gpu", "rtx4070"]) == 0
    out = capsys.readouterr().out
    for name in NAMED:
        assert f"  {name} " in out
    assert "Recommended:" in out and "Memory at the peak" in out and "utilization" in out
    assert "37,580,963,840" in out  # 20 tokens per parameter
    assert "kWh" in out and "USD" in out


def test_json_contract(capsys):
    plan = run_json(capsys, "--model", "d20", "--gpu", "rtx4090", "--tokens", "11e9", "--price", "3.5",
                    "--currency", "TWD")
    assert set(plan["model"]) >= {"depth", "params", "flops_per_token"} and plan["model"]["depth"] == 20
    assert plan["model"]["params"] == 560_988_160
    gpu = plan["gpu"]
    assert set(gpu) >= {"name", "vram_bytes", "peak_bf16_flops", "peak_fp8_flops", "power_watts", "source"}
    assert gpu["peak_fp8_flops"] == 330.3e12 and plan["gpus"] == 1
    assert plan["tokens"] == 20_981 * 524_288  # 11e9 tokens in whole steps
    assert [c["recipe"]["name"] for c in plan["candidates"]] == list(NAMED)
    for c in plan["candidates"]:
        assert set(c) >= {"recipe", "fits", "memory", "mfu", "tokens_per_s", "time_s", "energy_kwh", "cost"}
        assert set(c["memory"]) >= CONTRACT_MEMORY
        parts = sum(c["memory"][k] for k in CONTRACT_MEMORY - {"total"})
        assert parts == c["memory"]["total"]
        assert c["cost"]["currency"] == "TWD"
        assert c["cost"]["amount"] == pytest.approx(c["energy_kwh"] * 3.5)
        assert c["fits"] == (c["memory"]["total"] <= gpu["vram_bytes"])
    fitting = [c for c in plan["candidates"] if c["fits"]]
    assert plan["best"] == min(fitting, key=lambda c: c["time_s"])


def test_one_named_recipe_that_does_not_fit_says_what_overflows_and_what_fits(capsys):
    plan = run_json(capsys, "--model", "d32", "--gpu", "rtx4070", "--recipe", "baseline")
    assert plan["best"] is None and "over" in plan["reason"]
    assert len(plan["candidates"]) == 1 and plan["candidates"][0]["recipe"]["name"] == "baseline"
    nearest = plan["nearest"]["best"]
    assert plan["nearest"]["model"]["depth"] == 32 and nearest["fits"]  # d32 fits with another recipe
    assert nearest["recipe"]["name"] != "baseline"
    assert main(["plan", "--model", "d32", "--gpu", "rtx4060", "--vram", "4"]) == 0  # nothing at d32
    out = capsys.readouterr().out
    assert "Nothing fits" in out and "Nearest plan that fits: d" in out and "d32 " not in out.split("Nearest")[1]


def test_a_recipe_the_card_cannot_run_says_why_not_how_far_over(capsys):
    """lean-fp8 on an RTX 3090 said it "needs 6.04 GiB of 24.00 GiB: -17.96 GiB over"."""
    plan = run_json(capsys, "--model", "d12", "--gpu", "rtx3090", "--recipe", "lean-fp8")
    assert plan["best"] is None and plan["reason"] == "lean-fp8 cannot run on this card: no FP8 tensor cores on sm_86"
    assert plan["nearest"]["best"]["fits"]
    for mode in (["--days", "30"], ["--target", "gpt2"]):  # a search said only that no model fits
        assert main(["plan", "--gpu", "rtx3090", "--recipe", "lean-fp8", *mode]) == 2
        assert "lean-fp8 cannot run on NVIDIA GeForce RTX 3090: no FP8 tensor cores" in capsys.readouterr().err


def test_days_with_a_model_gives_the_tokens_that_fit(capsys):
    plan = run_json(capsys, "--model", "d12", "--gpu", "rtx4070", "--days", "2")
    assert plan["best"]["time_s"] == pytest.approx(2 * 86400, rel=1e-3)
    assert plan["tokens"] == plan["best"]["tokens"] > 0


def test_budget_mode_lists_the_best_models_for_the_time(capsys):
    plan = run_json(capsys, "--gpu", "rtx4070", "--days", "30")
    assert set(plan) >= {"model", "tokens", "best", "alternatives", "gpu"}
    assert plan["best"]["time_s"] <= 30 * 86400 and plan["best"]["fits"]
    depths = [plan["model"]["depth"]] + [a["model"]["depth"] for a in plan["alternatives"]]
    assert depths == sorted(depths, reverse=True) and len(depths) > 1
    assert plan["tokens"] == 20 * plan["model"]["params"]
    assert main(["plan", "--gpu", "rtx4070", "--days", "30"]) == 0
    assert "Best: d" in capsys.readouterr().out


def test_budget_mode_searches_every_depth_plan_takes(monkeypatch):
    """It stopped at d64: 8 H200s for 100 days were told d64 (49 days) was the best, where d72
    trains in 96; every model fitting and finishing at once, the deepest is the one --model takes."""
    from types import SimpleNamespace

    from onecard.model_config import MAX_DEPTH
    from onecard.plan import search
    from onecard.plan.catalog import CATALOG

    monkeypatch.setattr(search, "candidates", lambda *a, **k: [])
    monkeypatch.setattr(search, "fastest_fit", lambda cands: SimpleNamespace(time_s=0.0))
    found = search.budget(search.Settings(gpu=CATALOG["h200"]), days=1, ratio=None)
    assert found[0][0].n_layer == MAX_DEPTH


def test_recipe_is_the_one_planned_in_every_mode(capsys):
    """--days without a model and --target gpt2 took --recipe and planned every recipe anyway."""
    budget = run_json(capsys, "--gpu", "rtx4070", "--days", "10", "--recipe", "offload-max")
    assert budget["best"]["recipe"]["name"] == "offload-max" and "--recipe offload-max" in budget["command"]
    assert {a["best"]["recipe"]["name"] for a in budget["alternatives"]} == {"offload-max"}
    gpt2 = run_json(capsys, "--gpu", "rtx4070", "--target", "gpt2", "--recipe", "offload")
    assert {r["best"]["recipe"]["name"] for r in gpt2["runs"]} == {"offload"}



def test_a_named_recipe_is_not_called_the_fastest_that_fits(capsys):
    assert main(["plan", "--model", "d12", "--gpu", "rtx4070", "--recipe", "lean"]) == 0
    out = capsys.readouterr().out
    assert "Plan: lean (" in out and "the recipe asked for" in out and "Recommended" not in out

def test_several_gpus_and_overrides(capsys):
    one = run_json(capsys, "--model", "d26", "--gpu", "h100", "--mfu", "0.4")
    eight = run_json(capsys, "--model", "d26", "--gpu", "h100", "--mfu", "0.4", "--gpus", "8")
    assert eight["gpus"] == 8
    speedup = eight["best"]["tokens_per_s"] / one["best"]["tokens_per_s"]
    assert 6 < speedup <= 8
    assert any("SXM" in n for n in one["notes"])  # the short name picked a part and said so
    lean = run_json(capsys, "--model", "d26", "--gpu", "h100", "--assume", "fragmentation=0",
                    "--vram", "20", "--power", "300")
    assert lean["gpu"]["vram_bytes"] == 20 * 2**30
    assert lean["best"]["memory"]["detail"]["fragmentation"] == 0


def test_small_quantities_are_not_rounded_away(capsys):
    """A 40-minute d4 run used to read "0 kWh" beside a real cost, and its PCIe time "0.0 s" under a
    line saying 0.7 GB cross PCIe every step; the parts of a step now add up to its total."""
    import re

    assert main(["plan", "--model", "d4", "--gpu", "4090", "--recipe", "offload"]) == 0
    out = capsys.readouterr().out
    energy = re.search(r"x ([\d.,]+) h = ([\d.,]+) kWh -> ([\d.]+) USD", out)
    assert float(energy.group(1)) > 0 and float(energy.group(2)) > 0 and float(energy.group(3)) > 0
    step = re.search(r"per step +(.*) = ([\d.]+) s for", out)
    parts = [float(x) for x in re.findall(r"([\d.]+(?:e-?\d+)?) s (?:GPU|optimizer|PCIe)", step.group(1))]
    assert len(parts) == 3 and parts[2] > 0 and sum(parts) == pytest.approx(float(step.group(2)), rel=0.02)


def test_tokens_are_whole_steps_as_train_runs_them(capsys):
    """A budget or token count under one optimizer step used to plan "0 steps" (train runs one)."""
    plan = run_json(capsys, "--model", "d20", "--gpu", "4090", "--tokens", "100")
    assert plan["best"]["tokens"] == 524_288
    plan = run_json(capsys, "--model", "d20", "--gpu", "4090", "--days", "1")
    assert plan["best"]["tokens"] % 524_288 == 0 and plan["best"]["time_s"] <= 86400
    assert main(["plan", "--model", "d20", "--gpu", "4090", "--days", "0.0001"]) == 2
    assert "shorter than one optimizer step" in capsys.readouterr().err
    assert main(["plan", "--model", "d20", "--gpu", "4090", "--days", "3", "--ratio", "10"]) == 2  # was ignored
    assert "--ratio or --days" in capsys.readouterr().err


def test_plan_and_train_agree_on_a_nanochat_2026_model(capsys, tmp_path):
    """plan used the classic's vocabulary, batch and 20 tokens per parameter for this family: for d20,
    1.40 B parameters and 28 B tokens, where train runs 0.90 B and 5.2 B (nanochat's ratio 12 over
    the matrices and lm_head, its batch for the depth)."""
    from onecard.model_config import scaling_params
    from onecard.schedule_2026 import auto_total_batch

    plan = run_json(capsys, "--arch", "nanochat-2026", "--model", "d20", "--gpu", "rtx4070")
    config = GPTConfig.from_depth(20, vocab_size=32768, arch="nanochat-2026")
    batch = auto_total_batch(config)
    assert plan["model"]["config"]["vocab_size"] == 32768 and plan["total_batch"] == batch == 2**20
    assert plan["tokens"] == round(12 * scaling_params(config) / batch) * batch
    assert main(["train", "--arch", "nanochat-2026", "--model", "d20", "--gpu", "rtx4070", "--dry-run",
                 "--run-dir", str(tmp_path / "r")]) == 0
    said = capsys.readouterr().out
    assert f"{plan['tokens'] // batch:,} steps × {batch:,} tokens = {plan['tokens']:,} tokens" in said


def test_a_cards_catalog_note_is_printed(capsys):
    assert main(["plan", "--model", "d20", "--gpu", "t4"]) == 0
    assert "note: Turing has no bf16 tensor cores" in capsys.readouterr().out


def test_a_dry_run_costs_at_the_price_given(capsys, tmp_path):
    assert main(["train", "--model", "d20", "--gpu", "rtx4070", "--dry-run", "--run-dir", str(tmp_path / "r"),
                 "--price", "0.4", "--currency", "EUR", "--power", "150"]) == 0
    assert "EUR at 0.4 EUR/kWh" in capsys.readouterr().out


def test_calibration_is_used_and_said(capsys, tmp_path, monkeypatch):
    home = tmp_path / "cal"
    home.mkdir()
    (home / "calibration.json").write_text(json.dumps({"rtx4070": {
        "mfu": 0.3, "power_watts": 180.0, "date": "2025-06-01T00:00:00", "train": {"depth": 12, "micro_batch": 8}}}))
    monkeypatch.setenv("ONECARD_HOME", str(home))
    plan = run_json(capsys, "--model", "d12", "--gpu", "rtx4070")
    assert all(c["utilization"] == 0.3 for c in plan["candidates"])
    assert any("calibration" in n for n in plan["notes"])
    assert "bench" in plan["utilization_source"]
    best = plan["best"]
    assert best["energy_kwh"] == pytest.approx(180 * best["time_s"] / 3.6e6)


def test_a_measured_speed_factor_scales_the_model_for_every_recipe(capsys, tmp_path, monkeypatch):
    """`onecard bench` stores how fast this card ran against the planner's model; later plans scale
    every recipe's modelled utilization by it (and its fixed per-layer time), at any depth."""
    modelled = run_json(capsys, "--model", "d20", "--gpu", "rtx4070")
    home = tmp_path / "cal"
    home.mkdir()
    (home / "calibration.json").write_text(json.dumps({"rtx4070": {
        "speed_factor": 0.8, "mfu": 0.41, "date": "2026-11-01T00:00:00",
        "train": {"depth": 12, "micro_batch": 8, "recipe": "baseline"}}}))
    monkeypatch.setenv("ONECARD_HOME", str(home))
    scaled = run_json(capsys, "--model", "d20", "--gpu", "rtx4070")
    for before, after in zip(modelled["candidates"], scaled["candidates"], strict=True):
        assert after["recipe"]["name"] == before["recipe"]["name"]
        assert after["utilization"] == pytest.approx(0.8 * before["utilization"])
    assert "measured by `onecard bench`" in scaled["utilization_source"] and "x0.80" in scaled["utilization_source"]
    assert "run `onecard bench` to measure yours" in modelled["utilization_source"]
    assert "to measure yours" not in scaled["utilization_source"]  # it has been: no advice to run it
    assert any("0.80x the modelled speed" in n for n in scaled["notes"])


@pytest.mark.parametrize("bad", [float("nan"), -1, 0, "abc", [200], 1e9])
def test_a_damaged_board_power_is_ignored(capsys, tmp_path, monkeypatch, bad):
    """A hand-edited calibration's power used to end in a traceback ("abc", a list) or a negative cost."""
    (tmp_path / "calibration.json").write_text(json.dumps({"rtx4070": {"speed_factor": 0.5, "power_watts": bad}}))
    monkeypatch.setenv("ONECARD_HOME", str(tmp_path))
    plan = run_json(capsys, "--model", "d12", "--gpu", "rtx4070")
    assert not any("board power" in n for n in plan["notes"]) and plan["best"]["energy_kwh"] > 0


@pytest.mark.parametrize("bad", [float("nan"), -1, 0, "fast", True, 1e9])
def test_a_damaged_speed_factor_is_ignored(capsys, tmp_path, monkeypatch, bad):
    (tmp_path / "calibration.json").write_text(json.dumps({"rtx4070": {"speed_factor": bad}}))
    monkeypatch.setenv("ONECARD_HOME", str(tmp_path))
    plan = run_json(capsys, "--model", "d12", "--gpu", "rtx4070")
    assert "measured by" not in plan["utilization_source"]


def test_bench_speed_factor_is_the_models_time_over_the_measured():
    """By hand (docs/time.md#utilization): d12 compiled, nothing recomputed, on an H100 (989.4 TFLOP/s,
    3.35 TB/s) runs 8 x 2048 tokens of 6N + 12LHQT FLOPs at 0.83 x 768 / (768 + 3.5 x 989.4/3.35)."""
    from onecard.bench import speed_factor
    from onecard.model_config import flops_per_token
    from onecard.plan.catalog import CATALOG
    from onecard.recipe import named_recipe

    config = GPTConfig.from_depth(12)
    recipe = named_recipe("baseline", micro_batch=8, compile=True)
    utilization = 0.83 * 768 / (768 + 3.5 * 989.4e12 / 3.35e12)
    modelled_s = 8 * 2048 * flops_per_token(config) / (989.4e12 * utilization)
    assert speed_factor(config, recipe, CATALOG["h100-sxm"], 2 * modelled_s) == pytest.approx(0.5)
    assert speed_factor(config, recipe, CATALOG["h100-sxm"], modelled_s / 1.25) == pytest.approx(1.25)


@pytest.mark.parametrize("name, calibrates", [("baseline", True), ("lean", True), ("offload", False),
                                               ("offload-max", False)])
def test_bench_calibrates_only_with_recipes_whose_forward_backward_is_compute(monkeypatch, name, calibrates):
    """Activation offload and CPU gradients copy across PCIe inside forward-backward, time the planner
    counts apart from compute: their factor came out far below 1 and then slowed every plan on the card."""
    import onecard.device
    import onecard.measure
    import onecard.meters
    from onecard.bench import measure
    from onecard.recipe import named_recipe

    monkeypatch.setattr(onecard.device, "local_card", lambda: ("NVIDIA GeForce RTX 4070", 12 * 2**30))
    monkeypatch.setattr(onecard.measure, "matmul_flops", lambda *a, **k: 40e12)
    monkeypatch.setattr(onecard.meters, "nvml_power_reader", lambda device: None)
    monkeypatch.setattr(onecard.measure, "time_recipe_steps", lambda *a, **k: {
        "outcome": "ran", "forward_backward_s": 2.0, "forward_backward_tokens_per_s": 8192.0, "tokens_per_s": 7000.0,
        "step_s": 2.3, "update_s": 0.3, "max_memory_allocated": 2**30})
    recipe = named_recipe(name, micro_batch=8, seq_len=2048)
    record, text = measure("cuda", None, GPTConfig.from_depth(12), recipe, 3, 64)
    assert ("speed_factor" in record) == calibrates and ("mfu" in record) == calibrates
    assert ("not a calibration" in "\n".join(text)) != calibrates


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plan.png"
    assert main(["plan", "--model", "d20", "--gpu", "rtx3060", "--plot", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode, none_fits", [(["--target", "gpt2"], ["--vram", "2"]),
                                             (["--days", "3"], ["--days", "0.001"])])
def test_plot_in_every_mode(mode, none_fits, tmp_path, capsys, monkeypatch):
    """--target gpt2 took --plot, checked its path and drew nothing; a budget drew without saying so,
    or (nothing fitting) wrote no file and said nothing."""
    from onecard.plan import report

    drawn = []
    monkeypatch.setattr(report, "plot", lambda cands, s, path, title: drawn.append((len(cands), path)))
    path = str(tmp_path / "plan.png")
    assert main(["plan", "--gpu", "rtx4070", *mode, "--plot", path]) == 0
    assert drawn == [(8, path)] and f"wrote {path}" in capsys.readouterr().out
    assert main(["plan", "--gpu", "rtx4070", *mode, *none_fits, "--plot", path]) == 0
    assert len(drawn) == 1 and "nothing drawn" in capsys.readouterr().out


BAD = [
    ["--model", "d32", "--gpu", "rtx4070", "--tokens", "-5"],
    ["--model", "d32", "--gpu", "rtx4070", "--tokens", "0"],
    ["--model", "d32", "--gpu", "rtx4070", "--days", "0"],
    ["--model", "d32", "--gpu", "rtx4070", "--days", "-1"],
    ["--model", "d32", "--gpu", "rtx4070", "--vram", "0"],
    ["--model", "d32", "--gpu", "rtx4070", "--vram", "0.5"],  # below the CUDA context
    ["--model", "d32", "--gpu", "rtx 9999"],
    ["--model", "d5", "--gpu", "rtx4070"],  # 320 wide, 3 heads: they do not divide
    ["--depth", "9", "--gpu", "rtx4070"],  # 576 wide, 5 heads
    ["--model", "d32", "--gpu", "rtx4070", "--tokens", "1e9", "--days", "3"],
    ["--model", "d32", "--gpu", "rtx4070", "--mfu", "1.5"],
    ["--model", "d32", "--gpu", "rtx4070", "--total-batch", "1000"],
    ["--model", "d32", "--gpu", "rtx4070", "--recipe", "magic"],
    ["--model", "x32", "--gpu", "rtx4070"],
    ["--model", "d32", "--gpu", "rtx4070", "--tokens", "many"],
    ["--model", "d32", "--gpu", "rtx4070", "--assume", "nonsense=1"],
    ["--gpu", "rtx4070"],
]


def exit_code(argv):
    """main's return code, or argparse's exit code for errors it catches itself."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a[2:]) or "no-model")
def test_bad_input_is_one_line_and_exit_2(args, capsys):
    assert exit_code(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--seq-len", "1024"), ("--vocab-size", "50000"),
                                         ("--total-batch", "262144")])
def test_target_gpt2_refuses_a_shape_it_would_not_plan(flag, value, capsys):
    """--target gpt2 planned the published runs' shape but put the flag into its "Run it" line,
    a command that trained another model than the one planned."""
    assert exit_code(["plan", "--gpu", "rtx4070", "--target", "gpt2", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_target_gpt2_refuses_the_classic_family_it_would_not_plan(capsys):
    """--target gpt2 --arch classic planned nanochat-2026 runs without a word."""
    assert exit_code(["plan", "--gpu", "rtx4070", "--target", "gpt2", "--arch", "classic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --arch classic" in err
    assert exit_code(["plan", "--gpu", "rtx4070", "--target", "gpt2", "--arch", "nanochat-2026"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_gpu_named_and_none_here(capsys):
    assert main(["plan", "--model", "d20"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of bench")
def test_bench_on_cpu_measures_the_matmul_and_stores_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONECARD_HOME", str(tmp_path))
    assert main(["bench", "--size", "128"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    stored = json.loads((tmp_path / "calibration.json").read_text())
    assert stored["cpu"]["matmul_flops_fp32"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of bench")
def test_bench_times_the_recipes_own_step_with_its_own_optimizer(tmp_path, monkeypatch, capsys):
    """bench runs the trainer's TrainStep with the recipe's optimizer (8-bit states for lean), not AdamW."""
    import onecard.measure
    from onecard.optim import Muon
    from onecard.step import TrainStep

    monkeypatch.setenv("ONECARD_HOME", str(tmp_path))
    built, stepped = [], []
    real_build, real_update = onecard.measure.build_optimizer, TrainStep.update
    monkeypatch.setattr(onecard.measure, "build_optimizer", lambda *a, **k: built.append(real_build(*a, **k))
                        or built[-1])
    monkeypatch.setattr(TrainStep, "update", lambda self, loss, snapshot: stepped.append(loss)
                        or real_update(self, loss, snapshot))
    assert main(["bench", "--size", "64", "--recipe", "lean", "--no-save", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["recipe"] == "lean" and record["train"]["recipe"] == "lean"
    assert len(stepped) == record["train"]["steps"] == 3  # two warm-up steps and the timed one, each updated
    assert any(isinstance(o, Muon) for o in built[0].optimizers)
    states = [t for o in built[0].optimizers for t in o.state_tensors()]
    assert states and all(t.fmt == "int8" for t in states)
    train = record["train"]
    assert train["update_s"] > 0 and train["forward_backward_s"] > 0
    # the CPU shape (d2, 2 x 128 tokens) and the MFU basis: model FLOPs of forward-backward only
    from onecard.model_config import GPTConfig, flops_per_token
    assert (train["depth"], train["tokens"]) == (2, 2 * 128)
    expected = 2 * 128 / train["forward_backward_s"] * flops_per_token(GPTConfig.from_depth(2, sequence_len=128))
    assert train["model_flops_per_s"] == pytest.approx(expected, rel=1e-9)



def test_host_ram_is_shared_by_the_ranks_on_one_machine(monkeypatch, tmp_path):
    """Each rank checked a recipe's host RAM against all of the machine's free memory."""
    import builtins

    from onecard.device import host_memory_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                          *a, **k))
    assert host_memory_available() == 32 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host_memory_available() == 8 * 2**30


@pytest.mark.parametrize("plan_args, pick", [
    (["--model", "d20", "--gpu", "rtx4070"], lambda p: (p["command"], p["best"])),
    (["--model", "d20", "--gpu", "rtx4070", "--days", "7"], lambda p: (p["command"], p["best"])),
    (["--model", "d32", "--gpu", "rtx4070", "--vram", "8GB", "--seq-len", "1024"], lambda p: (p["command"], p["best"])),
    (["--days", "3", "--gpu", "rtx4090", "--arch", "nanochat-2026"], lambda p: (p["command"], p["best"])),
    (["--target", "gpt2", "--gpu", "rtx4070"], lambda p: (p["runs"][1]["command"], p["runs"][1]["best"])),
    # an assumption changes the fit (train refused this micro-batch when it fitted with the defaults),
    # and price and power the forecast the run records
    (["--model", "d12", "--gpu", "rtx4090", "--assume", "fragmentation=0", "--price", "0.3", "--currency", "EUR",
      "--power", "350"], lambda p: (p["command"], p["best"])),
])
def test_the_plans_run_it_line_trains_what_it_planned(capsys, tmp_path, monkeypatch, plan_args, pick):
    """The command the plan prints, given to `onecard train --dry-run` (which chooses through its own
    path): the same recipe, micro-batch and tokens as the plan's pick."""
    import re
    import shlex

    command, best = pick(run_json(capsys, *plan_args))
    words = shlex.split(command)
    assert words[:2] == ["onecard", "train"]
    data = tmp_path / words[words.index("--data") + 1]
    data.mkdir(parents=True)
    (data / "a.txt").write_text("some text")
    monkeypatch.chdir(tmp_path)
    assert main([*words[1:], "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    steps, batch, tokens = re.search(r"([\d,]+) steps × ([\d,]+) tokens = ([\d,]+) tokens", out).groups()
    assert int(tokens.replace(",", "")) == best["tokens"]
    assert f"recipe {best['recipe']['name']}: " in out
    assert f"micro-batch {best['recipe']['micro_batch']} x " in out
    if "--power" in plan_args:
        assert "350 W" in out and "EUR at 0.3 EUR/kWh" in out


def test_data_sizing_follows_the_family_and_the_folders_manifest(capsys, tmp_path):
    from onecard.datasources import CLIMBMIX, FINEWEB_EDU, shard_set_for, write_manifest

    assert shard_set_for("classic") is FINEWEB_EDU and shard_set_for("nanochat-2026") is CLIMBMIX
    write_manifest(tmp_path, {"dataset": "climbmix", "validation": ["shard_06542.parquet"]})
    assert shard_set_for("classic", tmp_path) is CLIMBMIX
    plan = run_json(capsys, "--model", "d12", "--gpu", "rtx4070", "--arch", "nanochat-2026")
    assert plan["data"]["dataset"] == "climbmix"
    assert main(["plan", "--model", "d12", "--gpu", "rtx4070", "--arch", "nanochat-2026"]) == 0
    assert "chars/token (FineWeb-EDU's, assumed)" in capsys.readouterr().out


def test_memory_other_processes_hold_is_left_out_of_the_fit(capsys, monkeypatch):
    """A desktop's display holds part of the card: the plan fits what is left, as --vram would."""
    import onecard.device

    gib = 2**30
    monkeypatch.setattr(onecard.device, "local_card", lambda: ("NVIDIA GeForce RTX 4070", 12 * gib, int(0.75 * gib)))
    detected = run_json(capsys, "--model", "d20")
    assert detected["gpu"]["vram_bytes"] == int(11.25 * gib)
    assert any("other processes hold 0.75 GiB" in note for note in detected["notes"])
    named = run_json(capsys, "--model", "d20", "--gpu", "rtx4070", "--vram", "11.25")
    assert detected["best"]["recipe"] == named["best"]["recipe"]
    assert detected["best"]["memory"]["total"] <= 11.25 * gib
    monkeypatch.setattr(onecard.device, "local_card", lambda: ("NVIDIA GeForce RTX 4070", 12 * gib, 0))
    assert run_json(capsys, "--model", "d20")["best"]["recipe"]["name"] == "baseline"  # 11.91 GiB: fits 12


def test_a_card_outside_the_catalog_is_refused_with_the_catalogs_cards_of_its_architecture(capsys, monkeypatch):
    import onecard.device

    gib = 2**30
    monkeypatch.setattr(onecard.device, "local_card", lambda: ("NVIDIA GeForce RTX 3050", 8 * gib, 0, (8, 6)))
    assert main(["plan", "--model", "d12"]) == 2
    err = capsys.readouterr().err
    assert "(NVIDIA GeForce RTX 3050) is not in the catalog" in err and "--vram 8" in err
    # the Ampere GeForce cards, nearest to 8 GiB first
    assert "the catalog's sm_86 cards, nearest in memory first: rtx3060ti, rtx3070, rtx3070ti" in err
    monkeypatch.setattr(onecard.device, "local_card", lambda: ("NVIDIA GeForce GTX 1080 Ti", 11 * gib, 0, (6, 1)))
    assert main(["plan", "--model", "d12"]) == 2
    assert "the catalog has no card of its architecture, sm_61" in capsys.readouterr().err
