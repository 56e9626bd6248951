"""The time model against hand-computed cases, and energy/cost arithmetic."""

import pytest

from onecard.model import GPTConfig, flops_per_token, param_counts
from onecard.plan.assumptions import DEFAULT, Assumptions
from onecard.plan.catalog import CATALOG
from onecard.plan.memory import activation_bytes
from onecard.plan.timing import (
    default_utilization,
    energy_kwh,
    fp8_flops_per_token,
    newton_schulz_flops,
    predict_time,
    recompute_flops_per_token,
)
from onecard.recipe import Recipe, named_recipe

D32 = GPTConfig.from_depth(32)
TOKENS_D32 = 37_580_963_840  # 20 x 1,879,048,192 (docs/architecture.md#training-horizon)
BATCH = 524_288


def test_d32_flops_per_token_is_nanochats():
    assert flops_per_token(D32) == pytest.approx(1.20796e10, rel=1e-5)
    assert flops_per_token(D32) * TOKENS_D32 == pytest.approx(4.54e20, rel=2e-3)


def test_reference_worked_example_d32_on_a_4070_at_full_utilization_is_90_days():
    """docs/time.md#worked-example: 4.54e20 / 58.3e12 = 7.8e6 s = 90 days of pure compute at 100 % MFU."""
    t = predict_time(D32, Recipe(micro_batch=1), CATALOG["rtx4070"], utilization=1.0)
    compute_days = TOKENS_D32 / BATCH * t.compute_s / 86400
    assert compute_days == pytest.approx(4.5396e20 / 58.3e12 / 86400, rel=1e-3)
    assert 89 < compute_days < 91


def test_compute_time_is_flops_over_peak_times_utilization():
    gpu = CATALOG["h100-sxm"]
    t = predict_time(D32, Recipe(micro_batch=8), gpu, utilization=0.51)
    assert t.compute_s == pytest.approx(BATCH * flops_per_token(D32) / (989.4e12 * 0.51))
    assert t.step_s == pytest.approx(t.compute_s + t.optimizer_s + t.pcie_s + t.comm_s)
    assert t.tokens_per_s == pytest.approx(BATCH / t.step_s)
    assert t.mfu == pytest.approx(flops_per_token(D32) * t.tokens_per_s / 989.4e12)
    assert t.mfu < 0.51  # the optimizer's time is not model FLOPs


def test_recompute_flops_by_hand():
    c = GPTConfig.from_depth(4, vocab_size=1000, sequence_len=256)
    d, L, blocks = 256, 4, param_counts(c)["blocks"]
    attention_fwd = 4 * L * c.n_head * c.head_dim * 256
    assert recompute_flops_per_token(c, Recipe(activations="keep")) == 0
    assert recompute_flops_per_token(c, Recipe(activations="full")) == 2 * blocks + attention_fwd
    assert recompute_flops_per_token(c, Recipe(activations="selective")) == 2 * L * 8 * d * d
    assert recompute_flops_per_token(c, Recipe(loss="chunked")) == 2 * 1000 * d
    # full recompute costs about a third more than the model's FLOPs: the 8/6 of docs/time.md#recompute
    ratio = 1 + recompute_flops_per_token(D32, Recipe(activations="full")) / flops_per_token(D32)
    assert 1.30 < ratio < 8 / 6


def test_newton_schulz_flops_by_hand():
    c = GPTConfig(sequence_len=64, vocab_size=100, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    square = 5 * (4 * 64**3 + 2 * 64**3)  # c_q, c_k, c_v, c_proj: 64 x 64
    wide = 5 * (4 * 64 * 64 * 256 + 2 * 64**3)  # c_fc and mlp.c_proj: 64 x 256 either way round
    assert newton_schulz_flops(c) == 4 * square + 2 * wide


def test_fp8_runs_block_linears_at_the_fp8_peak_with_its_efficiency():
    gpu = CATALOG["rtx4090"]
    r = Recipe(activations="full", loss="chunked", matmul="fp8", micro_batch=1, compile=True)
    t = predict_time(D32, r, gpu, utilization=0.4)
    fp8 = fp8_flops_per_token(D32, r)
    assert fp8 == 8 * param_counts(D32)["blocks"]  # forward, two backward GEMMs, recompute
    bf16 = flops_per_token(D32) + recompute_flops_per_token(D32, r) - fp8
    expected = BATCH * (bf16 / (165.2e12 * 0.4) + fp8 / (330.3e12 * 0.4 * DEFAULT.fp8_efficiency))
    assert t.compute_s == pytest.approx(expected)
    slower = predict_time(D32, r.with_(matmul="bf16"), gpu, utilization=0.4)
    assert 1.15 < slower.compute_s / t.compute_s < 1.5  # torchao-like end-to-end gains, not 2x
    # without compile the fp8 GEMMs run slower than bf16 ones (measured on an H200, see assumptions.py)
    eager = predict_time(D32, r.with_(compile=False), gpu, utilization=0.4)
    eager_rate = 165.2e12 * 0.4 * DEFAULT.fp8_eager_efficiency
    assert eager.compute_s == pytest.approx(BATCH * (bf16 / (165.2e12 * 0.4) + fp8 / eager_rate))
    assert 1.7 < eager.compute_s / slower.compute_s < 2.5  # measured: 1.8-2.1x (benchmarks/README.md)


def test_fp8_on_a_card_without_fp8_runs_in_bf16():
    r = Recipe(matmul="fp8", micro_batch=1)
    t = predict_time(D32, r, CATALOG["rtx3090"], utilization=0.4)
    assert t.fp8_flops_per_token == 0


def test_pcie_bytes_of_cpu_gradients_and_cpu_optimizer_by_hand():
    gpu = CATALOG["rtx4070"]
    r = named_recipe("offload", micro_batch=4)  # cpu_master, grads=cpu, states on the CPU, full, chunked
    t = predict_time(D32, r, gpu, utilization=0.4)
    n = sum(param_counts(D32).values())
    micro = BATCH // (4 * 2048)
    expected = micro * 2 * n + 2 * n + 4 * param_counts(D32)["blocks"]  # bf16 grads out; weights in; NS
    assert t.pcie_bytes == expected
    assert t.pcie_s == pytest.approx(expected / (16e9 * 16 * 128 / 130 / 8 * 0.8))
    # and each micro-batch's gradients are added up on the CPU at the fitted cost per parameter,
    # the part the backward pass does not hide exposed
    inline = predict_time(D32, r, gpu, utilization=0.4, assume=Assumptions(grad_fold_overlap=0.0))
    assert inline.grad_fold_s == pytest.approx(micro * n * DEFAULT.grad_fold_s_per_param)
    # overlapped: each micro-batch's folds hide behind its backward (and recompute), 3/4 of its
    # FLOPs here (the forward is 1/3 of 6N-style FLOPs, full recompute runs it once more)
    fold = n * DEFAULT.grad_fold_s_per_param
    assert t.grad_fold_s == pytest.approx(micro * max(0.0, fold - 0.75 * t.compute_s / micro))
    assert t.step_s == pytest.approx(t.compute_s + t.optimizer_s + t.pcie_s + t.grad_fold_s)


def test_activation_offload_adds_its_traffic():
    gpu = CATALOG["rtx4070"]
    r = named_recipe("offload-max", micro_batch=2)
    with_offload = predict_time(D32, r, gpu, utilization=0.4)
    without = predict_time(D32, r.with_(activations="keep"), gpu, utilization=0.4)
    traffic = with_offload.micro_steps * activation_bytes(D32, r).pcie_bytes
    assert with_offload.pcie_bytes - without.pcie_bytes == traffic


def test_pcie_overlap_assumption_hides_transfers():
    gpu = CATALOG["rtx4070"]
    r = named_recipe("offload", micro_batch=4)
    hidden = predict_time(D32, r, gpu, utilization=0.4, assume=Assumptions(pcie_overlap=1.0))
    assert hidden.pcie_s == 0


def test_data_parallel_scales_tokens_per_second_less_the_exchange():
    gpu = CATALOG["rtx4090"]
    r = Recipe(params="bf16_sr", grads="bf16", optim_states="int8", activations="full", loss="chunked",
               micro_batch=2)
    one = predict_time(D32, r, gpu, gpus=1, utilization=0.4)
    two = predict_time(D32, r, gpu, gpus=2, utilization=0.4)
    # bf16 gradients onto their owners, bf16 weights back: each tensor once over the link
    exchanged = (2 + 2) * sum(param_counts(D32).values())
    pcie = 16e9 * 16 * 128 / 130 / 8 * DEFAULT.pcie_efficiency
    assert two.comm_s == pytest.approx(exchanged / pcie * (1 - DEFAULT.dp_overlap))
    assert two.compute_s == pytest.approx(one.compute_s / 2)
    # each card updates the parameters it owns: about half the optimizer's work
    assert 0.45 < two.optimizer_s / one.optimizer_s < 0.55
    assert 1.9 < two.tokens_per_s / one.tokens_per_s < 2.0


def test_energy_and_cost():
    assert energy_kwh(3600, 200) == pytest.approx(0.2)
    assert energy_kwh(3600, 200, gpus=2, assume=Assumptions(overhead_watts=100)) == pytest.approx(0.5)
    assert energy_kwh(3600, 200, assume=Assumptions(power_fraction=0.9)) == pytest.approx(0.18)


def test_utilization_model_by_hand():
    """docs/time.md#utilization: ceiling x d / (d + width x FLOPs per byte), per card and mode."""
    a = DEFAULT
    for key in ("h100-sxm", "h200", "rtx4070", "rtx4090"):
        gpu = CATALOG[key]
        intensity = gpu.peak_bf16 / gpu.memory_bandwidth
        for compiled, width in ((True, a.compiled_overhead_width), (False, a.eager_overhead_width)):
            u, why = default_utilization(gpu, D32, compiled, a)
            assert u == pytest.approx(a.matmul_ceiling * 2048 / (2048 + width * intensity))
            assert ("compiled" if compiled else "eager") in why
    laptop, why = default_utilization(CATALOG["rtx4070-laptop"], D32, True)
    assert "laptop" in why and laptop < default_utilization(CATALOG["rtx4070"], D32, True)[0]
    # a consumer card the user has not measured is told how to (datacenter cards are in the fit)
    assert "run `onecard bench`" in predict_time(D32, named_recipe("baseline"), CATALOG["rtx4070"]).utilization_source
    assert "bench" not in predict_time(D32, named_recipe("baseline"), CATALOG["h100-sxm"]).utilization_source


def test_compile_wider_models_and_fewer_flops_per_byte_all_raise_utilization():
    h100, rtx4070 = CATALOG["h100-sxm"], CATALOG["rtx4070"]
    d20 = GPTConfig.from_depth(20)
    for gpu in (h100, rtx4070):
        assert default_utilization(gpu, D32, True)[0] > default_utilization(gpu, D32, False)[0]
        assert default_utilization(gpu, D32, True)[0] > default_utilization(gpu, d20, True)[0]
    # the RTX 4070 has 116 FLOPs per byte of bandwidth, the H100 295: elementwise work costs it less
    assert default_utilization(rtx4070, D32, False)[0] > default_utilization(h100, D32, False)[0]


def test_eager_micro_batches_pay_a_fixed_time_per_layer_and_the_optimizer_per_tensor():
    gpu = CATALOG["h200"]
    one = predict_time(D32, named_recipe("lean", micro_batch=1), gpu, total_batch=4096)
    u = default_utilization(gpu, D32, False)[0]
    flops = 4096 * (flops_per_token(D32) + recompute_flops_per_token(D32, named_recipe("lean")))
    assert one.compute_s == pytest.approx(flops / (gpu.peak_bf16 * u) + 2 * 32 * DEFAULT.eager_layer_overhead_s)
    tensors = 32 * 6 + 2
    assert one.optimizer_s >= tensors * DEFAULT.optimizer_tensor_overhead_s
    # a measured utilization (onecard bench, --mfu) already holds that fixed time
    given = predict_time(D32, named_recipe("lean", micro_batch=1), gpu, total_batch=4096, utilization=u)
    assert given.compute_s == pytest.approx(flops / (gpu.peak_bf16 * u))


def test_cpu_gradient_folding_hides_behind_backward_on_a_slow_card():
    r = named_recipe("offload", micro_batch=4)
    slow, fast = CATALOG["rtx4070"], CATALOG["h200"]
    n = sum(param_counts(D32).values())
    inline = Assumptions(grad_fold_overlap=0.0)
    for gpu in (slow, fast):
        assert predict_time(D32, r, gpu, assume=inline).grad_fold_s == pytest.approx(64 * n * 1.9e-9)
    # d32 at micro-batch 4 computes for seconds on an RTX 4070: the fold (3.6 s) hides behind it ...
    assert predict_time(D32, r, slow).grad_fold_s < 0.3 * predict_time(D32, r, slow, assume=inline).grad_fold_s
    # ... while an H200 finishes the backward long before the CPU has added the gradients up
    assert predict_time(D32, r, fast).grad_fold_s > 0.7 * predict_time(D32, r, fast, assume=inline).grad_fold_s


def test_nanochat_d32_run_on_8_h100s_is_reproduced():
    """docs/architecture.md#published-d32-run: d32 on 8 x H100, 71,680 steps of 524,288 tokens, ~1.57 s
    per step, ~31 hours, compiled. The compiled utilization is fitted to that run and nanochat's
    d20 (docs/time.md#utilization); this checks the arithmetic around it."""
    t = predict_time(D32, Recipe(micro_batch=8, compile=True), CATALOG["h100-sxm"], gpus=8)
    assert t.compute_s == pytest.approx(1.57, rel=0.10)
    # each of the 8 ranks updates the parameters it owns, as nanochat's DistMuon shares them out: an
    # eighth of the Newton-Schulz FLOPs (at the same utilization) and of the tensors and state
    # traffic. wte and lm_head each weigh exactly an eighth of the states, so the shares come out even.
    # docs/time.md#utilization by hand: compiled, width 2048, an H100's 989.4 TFLOP/s over 3.35 TB/s
    utilization = 0.83 * 2048 / (2048 + 3.5 * 989.4 / 3.35)
    newton_schulz_s = newton_schulz_flops(D32) / (989.4e12 * utilization)
    tensors_s = (32 * 6 + 2) * DEFAULT.optimizer_tensor_overhead_s
    whole = newton_schulz_s + tensors_s
    assert whole / 8 < t.optimizer_s < (whole + 0.03) / 8 * 1.01  # + ~30 GB of state
    hours = 71_680 * t.step_s / 3600
    assert 29 < hours < 33


def test_several_cards_on_one_host_share_its_memory_bandwidth_and_its_gradient_exchange():
    """torchrun --standalone puts every rank on one host: updates in CPU RAM stream through the same
    memory together (their time is not divided by the cards), and gradients kept in CPU RAM are
    summed there, at the host's memory bandwidth, not over the cards' links."""
    from onecard.plan.persistent import persistent_bytes

    gpu, d20 = CATALOG["rtx4090"], GPTConfig.from_depth(20)
    states = named_recipe("offload-states", micro_batch=4)
    one, two = (predict_time(d20, states, gpu, gpus=g, utilization=0.4) for g in (1, 2))
    p = persistent_bytes(d20, states, "cuda")
    host_s = 2 * (p.host_weights + p.host_optimizer + p.grads) / DEFAULT.cpu_memory_bandwidth
    assert host_s < two.optimizer_s < one.optimizer_s < host_s * 1.5
    offload = named_recipe("offload", micro_batch=4)
    eight = predict_time(d20, offload, CATALOG["h100-sxm"], gpus=8, utilization=0.4)
    p = persistent_bytes(d20, offload, "cuda")
    assert p.host_grads and eight.comm_s == pytest.approx(
        (p.grads + p.weights) / CATALOG["h100-sxm"].nvlink + p.host_grads / DEFAULT.cpu_memory_bandwidth)
