"""`onecard train` picks and executes a recipe: --gpu/--vram ask the planner, --recipe and the
per-field flags override, --dry-run predicts and exits, bad fits are refused with the breakdown."""

import json
import sys
from pathlib import Path

import pytest
import torch

from onecard.args import gigabytes
from onecard.cli import main
from onecard.data import Corpus, iter_texts
from onecard.errors import UsageError
from onecard.model import GPTConfig, build_model
from onecard.optim import build_optimizer
from onecard.plan.catalog import find_gpu, with_vram
from onecard.plan.choose import build_settings
from onecard.plan.memory import predict_memory
from onecard.plan.search import pick_recipe
from onecard.plan.timing import predict_time
from onecard.pretrain import train
from onecard.recipe import NAMED
from onecard.run import TrainSettings, compare_text
from onecard.tokenizer import Tokenizer


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(list(argv)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_vram_accepts_units():
    assert gigabytes("12GB") == gigabytes("12 GiB") == gigabytes("12g") == gigabytes("12") == 12.0
    assert gigabytes("12288MiB") == gigabytes("12288 MB") == 12.0  # as nvidia-smi prints it


@pytest.mark.parametrize("text", ["12TB", "12 kB", "12xb", "twelve GB"])
def test_vram_in_another_unit_says_which_units_it_takes(capsys, text):
    code, _, err = run_cli(capsys, "plan", "--model", "d20", "--gpu", "rtx4070", "--vram", text)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert repr(text) in err and "12GB" in err and "MiB" in err


def test_dry_run_names_the_fastest_recipe_that_fits_and_writes_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--model", "d32", "--gpu", "rtx4070", "--vram", "12GB", "--dry-run",
                           "--run-dir", str(run_dir))
    assert code == 0 and not run_dir.exists()
    chosen = out.split("recipe ")[2].split(":")[0]  # 'recipe NAME: params ...' after the header line
    micro = int(out.split("micro-batch ")[1].split()[0])
    # a plain search over every named recipe and micro-batch, straight on the memory and time models
    # (compiled, as a run on that card compiles): the fastest that fits in 12 GiB is what the command chose
    config, card = GPTConfig.from_depth(32), find_gpu("rtx4070")[0]
    fitting = {(name, b): predict_time(config, r.with_(micro_batch=b, compile=True), card).tokens_per_s
               for name, r in NAMED.items() for b in (1, 2, 4, 8, 16, 32)
               if predict_memory(config, r.with_(micro_batch=b, compile=True),
                                 micro_steps=524288 // (b * 2048)).total <= 12 * 2**30}
    assert fitting[(chosen, micro)] == max(fitting.values())
    assert "Memory at the peak" in out and "Time:" in out and "wall time" in out


def test_a_sized_model_without_data_is_told_it_would_read_the_embedded_corpus(capsys, tmp_path):
    """The dry run's data line counts FineWeb-EDU shards; without --data the run reads the
    standard library's few MB over and over, and the dry run says so (the demo needs no note)."""
    base = ("train", "--gpu", "rtx4070", "--dry-run", "--run-dir", str(tmp_path / "run"))
    code, out, _ = run_cli(capsys, *base, "--model", "d20")
    assert code == 0 and "note: no --data: this run trains on the embedded corpus" in out
    assert "give --data data/fineweb-edu" in out
    (tmp_path / "corpus.txt").write_text("some text to train on. " * 100)
    code, out, _ = run_cli(capsys, *base, "--model", "d20", "--data", str(tmp_path / "corpus.txt"))
    assert code == 0 and "no --data" not in out
    code, out, _ = run_cli(capsys, *base)
    assert code == 0 and "no --data" not in out


def test_leaner_cap_picks_leaner_or_smaller_micro_batch():
    config = GPTConfig.from_depth(20)
    picked = {}
    for cap in (24, 12, 8):
        s = build_settings(with_vram(find_gpu("rtx4090")[0], cap), [], seq_len=2048, total_batch=524288,
                           micro_batch=None, vocab_size=65536)
        picked[cap] = pick_recipe(config, s, tokens=10**9)
        assert picked[cap].memory.total <= cap * 2**30
    assert picked[8].memory.total < picked[12].memory.total <= picked[24].memory.total


def test_overrides_are_applied_and_named(capsys):
    code, out, _ = run_cli(capsys, "train", "--model", "d20", "--gpu", "rtx4090", "--recipe", "lean",
                           "--activations", "selective", "--compile", "--dry-run")
    assert code == 0
    assert "recipe lean+activations=selective+compile=True:" in out
    assert "activations selective" in out and "compile on" in out and "optim_states int8" in out


@pytest.mark.parametrize("argv, fragments", [
    (["--model", "d32", "--gpu", "rtx3090", "--recipe", "lean-fp8"], ["no FP8", "sm_86", "breakdown"]),
    (["--model", "d32", "--gpu", "rtx4070", "--vram", "4GB"], ["no recipe fits", "over", "leanest recipe's"]),
    (["--model", "d32", "--gpu", "rtx4070", "--recipe", "baseline"], ["cannot run", "breakdown", "fits"]),
    (["--model", "d32", "--gpu", "rtx4070", "--grads", "cpu", "--recipe", "lean"], ["grads=cpu needs"]),
])
def test_recipes_the_card_cannot_run_are_refused(capsys, argv, fragments):
    code, out, err = run_cli(capsys, "train", *argv, "--dry-run")
    assert code == 2 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_vram_without_a_card_to_plan_for(capsys):
    code, _, err = run_cli(capsys, "train", "--vram", "12GB", "--dry-run")
    assert code == 2 and "--gpu" in err and len(err.strip().splitlines()) == 1


def test_host_memory_too_small_rules_out_offload():
    config = GPTConfig.from_depth(32)
    s = build_settings(find_gpu("rtx4070-laptop")[0], [], seq_len=2048, total_batch=524288, micro_batch=None,
                       vocab_size=65536)
    assert pick_recipe(config, s, 10**9).recipe.optim_place == "cpu"  # only offloading fits 8 GiB
    with pytest.raises(Exception, match="host RAM"):
        pick_recipe(config, s, 10**9, host_bytes=2**30)


def test_prediction_beside_measurement_by_hand():
    prediction = {"gpu": "card", "recipe": "lean", "peak_bytes": 10 * 2**30, "peak_allocated_bytes": 8 * 2**30,
                  "step_time_s": 2.0, "tokens_per_s": 1000.0}
    history = [{"step_time_s": t, "skipped": False} for t in (9.0, 1.0, 3.0, 2.0)]  # first: warm-up, left out
    text = compare_text(prediction, {"vram_peak_bytes": 7 * 2**30}, history, total_batch=4000)
    assert "8.00 GiB" in text and "7.00 GiB" in text
    assert "2.000 s (median of 3 steps)" in text and "2,000" in text  # 4000 tokens / 2 s


def test_cli_runs_the_chosen_recipe(capsys, tmp_path):
    """A real (tiny) CPU run with a lean recipe and overrides: config.json holds what ran."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog "
                                                   f"{i % 7} " * 5}) for i in range(400)))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--depth", "1", "--vocab-size", "300", "--seq-len", "32",
                             "--micro-batch", "2", "--total-batch", "128", "--steps", "3", "--data", str(data),
                             "--run-dir", str(run_dir), "--recipe", "lean", "--loss", "full", "--eval-batches", "1")
    assert code == 0, err
    recipe = json.loads((run_dir / "config.json").read_text())["recipe"]
    assert recipe["name"] == "lean+loss=full" and recipe["loss"] == "full" and recipe["optim_states"] == "int8"
    assert recipe["micro_batch"] == 2 and recipe["seq_len"] == 32


@pytest.mark.parametrize("recipe_name, changes", [
    ("recompute", {}),
    ("recompute", {"activations": "offload"}),  # saved-tensor hooks around compiled code
    # gradients folded into CPU buffers by hooks on the folding thread, the optimizer on the CPU (fp32
    # weights: the named offload recipe's bf16 weights would compute in bf16, where compiled and eager
    # kernels round differently and Adam's first steps amplify that)
    ("recompute", {"grads": "cpu", "optim_place": "cpu"}),
], ids=["recompute", "activation-offload", "cpu-gradients"])
def test_compiled_training_matches_eager(tmp_path, recipe_name, changes):
    """recipe.compile runs the step through torch.compile, for recipes with hooks too (no fallback to
    eager); the weights after two steps match eager."""
    corpus = Corpus.embedded()
    tokenizer = Tokenizer.train(iter_texts(corpus, 100_000), 300)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64)
    weights = {}
    for compiled in (False, True):
        recipe = NAMED[recipe_name].with_(micro_batch=2, seq_len=32, compile=compiled, **changes)
        settings = TrainSettings(run_dir=Path(tmp_path / str(compiled)), steps=2, total_batch=128, eval_every=0,
                                 eval_batches=1, sample_tokens=1)
        result = train(config, tokenizer, corpus, recipe, settings, log=lambda *_: None)
        weights[compiled] = {k: v.detach().clone() for k, v in result["model"].state_dict().items()}
        assert (result["summary"]["compile_s"] is not None) == compiled  # the compile time is reported
    for key, eager in weights[False].items():
        torch.testing.assert_close(weights[True][key], eager, rtol=1e-4, atol=1e-5, msg=key)
    events = [json.loads(line) for line in (tmp_path / "True" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e.get("event") == "compiled"] == ["compiled"]
    assert not any(e.get("event") == "compile_failed" for e in events)


def gradients_per_backward_node(loss: torch.Tensor) -> list[list[torch.Tensor]]:
    """The parameters whose gradients each node of the backward graph hands over at once."""
    feeds, seen, todo = {}, set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and type(child).__name__ == "AccumulateGrad":
                feeds.setdefault(node, []).append(child.variable)
            todo.append(child)
    return sorted(feeds.values(), key=len)


def test_recipes_with_backward_hooks_compile_block_by_block():
    """A whole compiled model's backward is one node that hands every gradient over at once: a
    recipe whose memory rests on folding each gradient away as it appears (grads=cpu) would hold them
    all. Compiled block by block, a node hands over one block's (its six matrices) at most."""
    from onecard.plan.persistent import persistent_bytes
    from onecard.step import TrainStep

    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=2, n_kv_head=2, n_embd=64)
    inputs = torch.randint(0, 256, (2, 32))
    recipes = {"whole": NAMED["recompute"].with_(grads="bf16", compile=True),  # every .grad folded by a hook
               "per-block": NAMED["offload"].with_(compile=True), "eager": NAMED["offload"]}
    for how, recipe in recipes.items():
        assert recipe.compiles_per_block == (how == "per-block")
        model = build_model(config)
        model.set_policies(recipe.activations, recipe.loss)
        step = TrainStep(model, build_optimizer(model, recipe), "cpu", compile_model=recipe.compile)
        per_node = gradients_per_backward_node(step.step_model(inputs, inputs))
        sizes = {"whole": [20], "per-block": [1, 1, 6, 6, 6], "eager": [1] * 20}[how]
        assert [len(params) for params in per_node] == sizes  # per-block: wte, lm_head and each block
        # the planner's gradients in flight are the most bytes one node hands over, exactly
        most = max(sum(p.numel() * p.element_size() for p in params) for params in per_node)
        assert persistent_bytes(config, recipe, device="cpu").grad_transient == most, how


def test_cuda_runs_compile_by_default_and_no_compile_opts_out():
    """Planning for a card on CUDA: compiled unless --no-compile; a CPU run stays eager."""
    from onecard.plan.choose import RecipeRequest, choose_recipe
    config = GPTConfig.from_depth(4, vocab_size=1024, sequence_len=256)
    kwargs = dict(seq_len=256, micro_batch=4, total_batch=1024, tokens=10**6)
    assert choose_recipe(RecipeRequest(compile_by_default=True), config, "cpu", **kwargs).recipe.compile
    opted_out = RecipeRequest(compile_by_default=True, overrides={"compile": False})
    assert not choose_recipe(opted_out, config, "cpu", **kwargs).recipe.compile
    assert not choose_recipe(RecipeRequest(), config, "cpu", **kwargs).recipe.compile


def test_resumed_run_keeps_its_recipe():
    from onecard.plan.choose import RecipeRequest, choose_recipe
    args = RecipeRequest()
    resumed = NAMED["bf16"].with_(micro_batch=4, seq_len=64)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    choice = choose_recipe(args, config, "cpu", seq_len=64, micro_batch=4, total_batch=256, tokens=1000,
                           resumed=resumed)
    assert choice.recipe == resumed


@pytest.mark.parametrize("changes", [{}, {"grads": "cpu", "optim_place": "cpu"}], ids=["whole", "per-block"])
def test_a_failing_compile_falls_back_to_eager_with_the_same_result(tmp_path, monkeypatch, changes):
    """torch.compile can fail on a user's setup; the run then goes on uncompiled, redoing the step
    (blocks compiled in place are restored too)."""
    import onecard.step

    corpus = Corpus.embedded()
    tokenizer = Tokenizer.train(iter_texts(corpus, 100_000), 300)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64)

    def broken_compile(model):
        def compiled(*args, **kwargs):
            model(*args, **kwargs)  # draws randomness and uses a batch before failing, as a real one may
            raise RuntimeError("backend compiler failed\nmore detail")
        return compiled

    results, logs = {}, []
    for compiled in (False, True):
        if compiled:
            monkeypatch.setattr(onecard.step.torch, "compile", broken_compile)
        recipe = NAMED["baseline"].with_(micro_batch=2, seq_len=32, compile=compiled, **changes)
        settings = TrainSettings(run_dir=Path(tmp_path / str(compiled)), steps=2, total_batch=128, eval_every=0,
                                 eval_batches=1, sample_tokens=1)
        results[compiled] = train(config, tokenizer, corpus, recipe, settings, log=logs.append)
    assert any("torch.compile failed (RuntimeError: backend compiler failed)" in line for line in logs)
    assert results[True]["model"].compiled_blocks is None
    for key, value in results[False]["model"].state_dict().items():
        assert torch.equal(results[True]["model"].state_dict()[key], value), key
    events = [json.loads(line).get("event") for line in (tmp_path / "True" / "log.jsonl").read_text().splitlines()]
    assert "compile_failed" in events


def test_a_compile_error_after_the_first_step_falls_back_too(tmp_path, monkeypatch):
    """A recompile can fail later (SFT's padded batches bring new widths): the compiler's own error
    falls back to eager and redoes the step; any other error of a later step is the run's."""
    from torch._dynamo.exc import BackendCompilerFailed

    import onecard.step

    corpus = Corpus.embedded()
    tokenizer = Tokenizer.train(iter_texts(corpus, 100_000), 300)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64)

    def compile_failing_on_call(n: int, error: Exception):
        def compile_(model):
            calls = []

            def run(*args, **kwargs):
                calls.append(1)
                if len(calls) == n:
                    raise error
                return model(*args, **kwargs)
            return run
        return compile_

    def run(compiled: bool, name: str, logs: list):
        recipe = NAMED["baseline"].with_(micro_batch=2, seq_len=32, compile=compiled)
        settings = TrainSettings(run_dir=Path(tmp_path / name), steps=3, total_batch=128, eval_every=0,
                                 eval_batches=1, sample_tokens=1)
        return train(config, tokenizer, corpus, recipe, settings, log=logs.append)

    eager = run(False, "eager", [])
    recompile = BackendCompilerFailed(None, RuntimeError("inductor failed on a new shape"), None)
    monkeypatch.setattr(onecard.step.torch, "compile", compile_failing_on_call(5, recompile))  # step 3 of 3
    logs = []
    fell_back = run(True, "recompile", logs)
    assert any("torch.compile failed (BackendCompilerFailed" in line for line in logs)
    for key, value in eager["model"].state_dict().items():
        assert torch.equal(fell_back["model"].state_dict()[key], value), key
    monkeypatch.setattr(onecard.step.torch, "compile", compile_failing_on_call(5, ValueError("the model's own")))
    with pytest.raises(ValueError, match="the model's own"):
        run(True, "other", [])
    # the compiler out of memory is the card's out-of-memory, handled as such, not a reason to go eager
    oom = BackendCompilerFailed(None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), None)
    monkeypatch.setattr(onecard.step.torch, "compile", compile_failing_on_call(5, oom))
    logs = []
    with pytest.raises(UsageError, match="CUDA ran out of memory training with recipe baseline.*step 2 is saved"):
        run(True, "oom", logs)
    assert not any("torch.compile failed" in line for line in logs)


def test_a_real_run_skips_recipes_this_machine_cannot_execute():
    """Planning for an RTX 4070 on a machine without CUDA: a dry run may show fp8, a real run may not."""
    from onecard.device import unrunnable_reason
    from onecard.plan.choose import RecipeRequest, choose_recipe
    config = GPTConfig.from_depth(20)
    picked = {}
    for dry_run in (True, False):  # among recipes that recompute every block, fp8 is the fastest
        request = RecipeRequest(gpu="rtx4070", dry_run=dry_run, overrides={"activations": "full"})
        picked[dry_run] = choose_recipe(request, config, "cpu", seq_len=2048, micro_batch=None, total_batch=524288,
                                        tokens=10**9, why_not=lambda recipe: unrunnable_reason(recipe, "cpu"))
    assert picked[True].recipe.matmul == "fp8"  # the fastest for that card (see the planner)
    assert any("cannot run it" in note for note in picked[True].notes)
    assert picked[False].recipe.matmul == "bf16" and picked[False].candidate.fits
