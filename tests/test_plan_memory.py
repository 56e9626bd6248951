"""The planner's memory model against what the trainer really allocates and autograd really saves.

Parameters, gradients and optimizer states: exact, measured from onecard.optim's own tensors.
Activations: bytes autograd saves during a forward of the real model (unique storages seen by
saved_tensors_hooks, parameters and buffers excluded), within 5 %, for several tiny shapes, in
fp32 and under bf16 autocast, for each activation policy and loss the model supports.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from onecard.model import GPTConfig, build_model
from onecard.optim import build_optimizer
from onecard.plan.memory import activation_bytes, predict_memory
from onecard.plan.persistent import persistent_bytes, state_bytes
from onecard.recipe import INT8_BLOCK, Recipe
from tests.reference import nanochat

SHAPES = [  # (n_layer, n_embd, n_head, vocab, T, B)
    (2, 64, 1, 256, 32, 1),
    (3, 128, 2, 512, 64, 2),
    (2, 128, 1, 1024, 128, 4),
    (3, 64, 1, 320, 48, 3),
]


def make(n_layer, n_embd, n_head, vocab, T):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    return config, build_model(config)


def saved_bytes(model, idx, targets, autocast=False) -> int:
    """Unique storage bytes autograd saves in one forward, parameters and buffers excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(idx, targets)
    return sum(seen.values())


def batch(config, B, T):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g)
    return idx, torch.randint(0, config.vocab_size, (B, T), generator=g)


# ------------------------------------------------------------ parameters, gradients, states

RECIPES = [
    Recipe(),
    Recipe(optim_states="bf16"),
    Recipe(optim_states="int8"),
    Recipe(params="bf16_sr", grads="bf16", optim_states="int8"),
    Recipe(params="bf16_sr", grads="fp32", optim_states="bf16"),
    Recipe(params="fp32", grads="bf16", optim_states="fp32"),
    Recipe(params="cpu_master", grads="cpu", optim_states="fp32", optim_place="cpu"),
    Recipe(params="cpu_master", grads="cpu", optim_states="int8", optim_place="cpu"),
    Recipe(params="bf16_sr", grads="bf16", optim_states="bf16", optim_place="cpu"),
]


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.params}-{r.grads}-{r.optim_states}-{r.optim_place}")
def test_weights_grads_states_equal_what_the_optimizer_allocates(shape, recipe):
    *dims, T, B = shape
    config, model = make(*dims, T)
    opt = build_optimizer(model, recipe)
    model(*batch(config, B, T)).backward()
    opt.accumulate()
    real = opt.state_bytes()
    p = persistent_bytes(config, recipe, device="cpu")
    assert (p.weights, p.host_weights) == (real["weights"]["device"], real["weights"]["cpu"])
    assert (p.grads, p.host_grads) == (real["grads"]["device"], real["grads"]["cpu"])
    assert (p.optimizer, p.host_optimizer) == (real["optimizer"]["device"], real["optimizer"]["cpu"])
    # and what a checkpoint of the states holds (master copies and the rounding's RNG states aside) is the same bytes
    held = [{k: v for k, v in state.items() if k != "rounding_rng"} for s in opt.state_dict() for state in s["state"]]
    assert p.optimizer + p.host_optimizer == tensor_bytes(held)


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a nested state dict, fp32 master weights left out."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for k, v in tree.items() if k != "master")
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def test_int8_layout_one_byte_each_plus_a_scale_per_block():
    assert state_bytes(INT8_BLOCK, "int8") == INT8_BLOCK + 4
    assert state_bytes(INT8_BLOCK + 1, "int8") == INT8_BLOCK + 1 + 8  # the last block is short
    assert state_bytes(10, "bf16") == 20 and state_bytes(10, "fp32") == 40


def test_on_cuda_the_embedding_is_bf16_and_its_gradient_buffered_in_fp32():
    config = GPTConfig.from_depth(4, vocab_size=1024, sequence_len=64)
    p = persistent_bytes(config, Recipe(), device="cuda")
    cpu = persistent_bytes(config, Recipe(), device="cpu")
    vd = config.vocab_size * config.n_embd
    assert p.weights == cpu.weights - 2 * vd  # wte: 2 bytes instead of 4
    assert p.grads == cpu.grads  # grads=fp32: wte's folds into an fp32 buffer...
    assert p.grad_transient == 2 * vd  # ...through one bf16 .grad in flight


def test_d32_figures_of_the_reference():
    """docs/memory.md#d32-figures (rounded there): d32 weights ~7 GB as nanochat keeps them (fp32, wte
    bf16), Muon momentum 6.4 GB and AdamW moments 2.1 GB in fp32, 3.76 GB of bf16 weights."""
    config = GPTConfig.from_depth(32)
    p = persistent_bytes(config, Recipe(), device="cuda")
    blocks, vd = 1_610_612_736, 65536 * 2048
    assert p.weights == 4 * (blocks + vd) + 2 * vd == 7_247_757_312
    assert p.optimizer == 4 * blocks + 8 * 2 * vd
    assert round(4 * blocks / 1e9, 1) == 6.4 and round(8 * 2 * vd / 1e9, 1) == 2.1
    bf16 = persistent_bytes(config, Recipe(params="bf16_sr", grads="bf16"), device="cuda")
    assert round(bf16.weights / 1e9, 2) == 3.76


# ------------------------------------------------------------ activations

@pytest.mark.parametrize("shape", SHAPES)
def test_keep_full_loss_fp32_matches_saved_tensors(shape):
    *dims, T, B = shape
    config, model = make(*dims, T)
    recipe = Recipe(activations="keep", loss="full", micro_batch=B, seq_len=T)
    a = activation_bytes(config, recipe, numerics="fp32")
    measured = saved_bytes(model, *batch(config, B, T))
    assert a.saved + a.logits_saved == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("shape", SHAPES)
def test_keep_full_loss_bf16_autocast_matches_saved_tensors(shape):
    """The variant `plan` uses (bf16 autocast, fp32 residual); CPU autocast saves the same tensors
    as CUDA autocast here, and fp32 parameters get their bf16 copies kept."""
    *dims, T, B = shape
    config, model = make(*dims, T)
    recipe = Recipe(activations="keep", loss="full", micro_batch=B, seq_len=T)
    a = activation_bytes(config, recipe, numerics="bf16", params_fp32=True)
    measured = saved_bytes(model, *batch(config, B, T), autocast=True)
    assert a.saved + a.weight_copies + a.logits_saved == pytest.approx(measured, rel=0.05)


POLICIES = [(act, loss) for act in ("keep", "selective", "full") for loss in ("full", "chunked")]


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_each_policy_fp32_matches_saved_tensors(shape, policy):
    *dims, T, B = shape
    config, model = make(*dims, T)
    model.set_policies(*policy)
    recipe = Recipe(activations=policy[0], loss=policy[1], micro_batch=B, seq_len=T)
    a = activation_bytes(config, recipe, numerics="fp32")
    measured = saved_bytes(model, *batch(config, B, T))
    assert a.saved + a.logits_saved == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_each_policy_bf16_autocast_matches_saved_tensors(shape, policy):
    """Under autocast a checkpointed region (a recomputed block or MLP, a loss chunk) keeps no bf16
    copies of fp32 weights: it makes them again in backward."""
    *dims, T, B = shape
    config, model = make(*dims, T)
    model.set_policies(*policy)
    recipe = Recipe(activations=policy[0], loss=policy[1], micro_batch=B, seq_len=T)
    a = activation_bytes(config, recipe, numerics="bf16", params_fp32=True)
    measured = saved_bytes(model, *batch(config, B, T), autocast=True)
    assert a.saved + a.weight_copies + a.logits_saved == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_nanochat_2026_each_policy_matches_saved_tensors(numerics, policy):
    """The nanochat-2026 family (value embeddings, x0 mix, smear, backout, windows): under bf16
    autocast its value embeddings are bf16, as on CUDA (onecard/slots.py)."""
    from onecard.family import build_model as build_family

    config = GPTConfig(sequence_len=96, vocab_size=800, n_layer=6, n_head=3, n_kv_head=3, n_embd=192,
                       arch="nanochat-2026")
    torch.manual_seed(0)
    model = build_family(config)
    if numerics == "bf16":
        for table in model.value_embeds.values():
            table.to(torch.bfloat16)
    model.set_policies(*policy)
    B = 2
    recipe = Recipe(activations=policy[0], loss=policy[1], micro_batch=B, seq_len=96)
    a = activation_bytes(config, recipe, numerics=numerics, params_fp32=True)
    measured = saved_bytes(model, *batch(config, B, 96), autocast=numerics == "bf16")
    assert a.saved + a.weight_copies + a.logits_saved == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_offload_predicts_the_bytes_sent_to_host_memory(shape, numerics):
    *dims, T, B = shape
    config, model = make(*dims, T)
    model.set_policies("offload", "full")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=numerics == "bf16"):
        model(*batch(config, B, T))
    recipe = Recipe(activations="offload", loss="full", micro_batch=B, seq_len=T)
    a = activation_bytes(config, recipe, numerics=numerics, params_fp32=True)
    assert a.host == pytest.approx(model.offloaded_bytes, rel=0.05)


class FusedNorm(torch.autograd.Function):
    """onecard's norm as it runs on CUDA: rms_norm dispatches to CUDA's fused kernel, whose autograd
    saves its input once and an fp32 rstd per row (`_fused_rms_norm` in pytorch/pytorch
    tools/autograd/derivatives.yaml); the CPU's composite saves more. The same arithmetic."""

    @staticmethod
    def forward(ctx, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # computed in fp32 at least
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(xf.dtype).eps)
        ctx.save_for_backward(x, rstd)
        return (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        normed, g = x.to(rstd.dtype) * rstd, grad.to(rstd.dtype)
        return ((g - normed * (g * normed).mean(-1, keepdim=True)) * rstd).to(x.dtype)


@pytest.fixture
def cuda_eager(monkeypatch):
    """Make a model on the CPU save what the trainer's eager step saves on CUDA: the embeddings in
    bf16 (onecard/slots.py), with bf16 parameters everything, and CUDA's fused norm."""
    import onecard.model
    import onecard.model_2026

    def fused_norm(x):
        return FusedNorm.apply(x)

    def prepare(model, params_fp32: bool = True):
        monkeypatch.setattr(onecard.model, "norm", fused_norm)
        monkeypatch.setattr(onecard.model_2026, "norm", fused_norm)
        embeddings = getattr(model, "bf16_on_cuda", lambda: [model.transformer.wte.weight])()
        for p in (embeddings if params_fp32 else model.parameters()):
            p.data = p.data.bfloat16()
        return model
    return prepare


def test_the_fused_norm_stand_in_computes_rms_norm():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(FusedNorm.apply, (x,))
    torch.testing.assert_close(FusedNorm.apply(x), F.rms_norm(x, (16,)))


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("params_fp32", [True, False], ids=["fp32-params", "bf16-params"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_the_eager_count_bounds_what_cuda_saves(shape, params_fp32, policy, cuda_eager):
    """On CUDA the embedding is bf16, so the eager residual stream is bf16 and the norm is CUDA's
    fused kernel: the step saves less than the fp32-residual count `plan` uses, 1.1 to 2.0 times
    less. The planner keeps the larger count on purpose: it matches the H200's measured eager peaks
    (tests/test_plan_vs_measured.py), which the exact count plus the modelled backward temporaries
    falls well short of (docs/memory.md#activations)."""
    *dims, T, B = shape
    config, model = make(*dims, T)
    cuda_eager(model, params_fp32)
    model.set_policies(*policy)
    recipe = Recipe(activations=policy[0], loss=policy[1], micro_batch=B, seq_len=T)
    a = activation_bytes(config, recipe, numerics="bf16", params_fp32=params_fp32)
    counted = a.saved + a.weight_copies + a.logits_saved
    measured = saved_bytes(model, *batch(config, B, T), autocast=True)
    assert 1.1 * measured < counted < 2.05 * measured


def test_recompute_and_chunking_shrink_the_peak_in_order():
    config = GPTConfig.from_depth(20)
    totals = [predict_memory(config, Recipe(activations=act, loss=loss, micro_batch=4)).total
              for act, loss in [("keep", "full"), ("selective", "full"), ("full", "full"), ("full", "chunked")]]
    assert totals == sorted(totals, reverse=True)


def test_full_logits_peak_is_fp32_logits_and_their_gradient():
    """loss=full under autocast: bf16 soft-capped logits + fp32 log-softmax saved (6 B/logit), and at
    the start of backward two fp32 gradients of the same size (14 B/logit in all)."""
    config = GPTConfig.from_depth(4, vocab_size=1000, sequence_len=256)
    r = Recipe(micro_batch=2, seq_len=256)
    a = activation_bytes(config, r)
    logits = 2 * 256 * 1000
    assert a.logits_saved - (8 * 512 + 4) == 6 * logits
    assert a.logits_peak - (8 * 512 + 4) == 14 * logits
    chunked = activation_bytes(config, r.with_(loss="chunked"))
    assert chunked.logits_peak - (8 * 512 + 4) == 14 * 512 * 1000  # 512 rows < LOSS_CHUNK_ROWS: one chunk


# ------------------------------------------------------------ compiled

@contextlib.contextmanager
def cuda_autocast_casts(norm_fp32: bool = True):
    """CUDA's bf16 autocast as torch >= 2.12 applies it to this model, made on the CPU so that a
    trace sees it: CPU autocast (linear layers and attention in bf16) plus rms_norm in fp32 wherever
    autocast is on (ATen's AT_FORALL_FP32 list, torch/include/ATen/autocast_mode.h, since
    pytorch/pytorch#174824; CPU autocast leaves a bf16 rms_norm in bf16). onecard's norm runs
    outside autocast and so stays in its input's dtype; nanochat's fae3aca norm does not. norm_fp32
    False: torch <= 2.11's policy, under which nanochat's published runs were made."""
    rms_norm = F.rms_norm

    def fp32_policy(x, shape, weight=None, eps=None):
        upcast = norm_fp32 and torch.is_autocast_enabled("cpu")
        return rms_norm(x.float() if upcast else x, shape, weight, eps)

    F.rms_norm = fp32_policy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        F.rms_norm = rms_norm


def compiled_saved_bytes(model, idx, targets, norm_fp32: bool = True) -> int:
    """Bytes the forward graph torch.compile makes keeps for backward: the partition inductor makes
    (its decompositions, its min-cut partitioner) under CUDA autocast's casts, traced on the CPU
    without generating kernels. Parameters and buffers are not counted; ids and targets are."""
    import functools

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    kept = []

    def forward_graph(gm, example_inputs):
        output = next(node for node in gm.graph.nodes if node.op == "output")
        for node in output.args[0][1:]:  # the loss first, then what backward needs
            value = node.meta.get("val") if hasattr(node, "meta") else None
            if not isinstance(value, torch.Tensor) or any(not isinstance(s, int) for s in value.shape):
                continue
            if node.name.startswith("primals_") and value.is_floating_point():
                continue  # a parameter or buffer
            kept.append(value.numel() * value.element_size())
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
        return aot_module_simplified(gm, example_inputs, decompositions=select_decomp_table(),
                                     fw_compiler=forward_graph, bw_compiler=lambda g, _: make_boxed_func(g),
                                     partition_fn=partition)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with cuda_autocast_casts(norm_fp32):
        compiled(idx, targets).backward()
    torch._dynamo.reset()
    return sum(kept)


COMPILED_POLICIES = [(act, loss) for act in ("keep", "selective", "full") for loss in ("full", "chunked")]


@pytest.mark.parametrize("policy", COMPILED_POLICIES, ids=lambda p: "-".join(p))
def test_compiled_counts_match_inductors_partition(policy):
    """The compiled model (recipe.compile) against what inductor's partition of onecard's model keeps,
    with the embedding in bf16 and autocast's casts as on CUDA."""
    n_layer, n_embd, n_head, vocab, T, B = 2, 128, 2, 1000, 64, 4
    config, model = make(n_layer, n_embd, n_head, vocab, T)
    model.transformer.wte.to(torch.bfloat16)
    model.set_policies(*policy)
    recipe = Recipe(activations=policy[0], loss=policy[1], micro_batch=B, seq_len=T, compile=True)
    a = activation_bytes(config, recipe, params_fp32=True)
    measured = compiled_saved_bytes(model, *batch(config, B, T))
    assert a.saved + a.weight_copies + a.logits_saved == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("policy", [("keep", "full"), ("selective", "chunked"), ("full", "chunked")],
                         ids=lambda p: "-".join(p))
def test_compiled_nanochat_2026_counts_match_inductors_partition(policy):
    """nanochat-2026 compiled: the partition recomputes the x0 mix, keeps the value embeddings looked
    up (bf16, as the embeddings are on CUDA) and, unless every block is re-run, x0."""
    from onecard.family import build_model as build_family

    config = GPTConfig(sequence_len=96, vocab_size=800, n_layer=6, n_head=3, n_kv_head=3, n_embd=192,
                       arch="nanochat-2026")
    torch.manual_seed(0)
    model = build_family(config)
    for table in [model.transformer.wte, *model.value_embeds.values()]:
        table.to(torch.bfloat16)
    model.set_policies(*policy)
    recipe = Recipe(activations=policy[0], loss=policy[1], micro_batch=2, seq_len=96, compile=True)
    a = activation_bytes(config, recipe, params_fp32=True)
    measured = compiled_saved_bytes(model, *batch(config, 2, 96))
    assert a.saved + a.weight_copies + a.logits_saved == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("policy", [("keep", "full"), ("keep", "chunked")], ids=lambda p: "-".join(p))
def test_compiled_graph_keeps_what_nanochats_keeps(policy):
    """Parity with nanochat's own model (fae3aca, the architecture of its published d20 and d32):
    traced through the same partition under the autocast of its published runs (torch <= 2.11),
    onecard's baseline keeps the same bytes for backward, and its chunked loss less. Under torch
    >= 2.12's fp32 rms_norm nanochat's residual stream turns fp32 (4 bytes more per token, width
    and block); onecard's norm, outside autocast, keeps what it kept."""
    gpt = nanochat("fae3aca", "gpt")
    n_layer, n_embd, n_head, vocab, T, B = 2, 128, 2, 1000, 64, 4
    torch.manual_seed(0)
    theirs = gpt.GPT(gpt.GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                                   n_kv_head=n_head, n_embd=n_embd))
    theirs.init_weights()  # its embedding is bf16, as onecard's on CUDA
    config, ours = make(n_layer, n_embd, n_head, vocab, T)
    ours.transformer.wte.to(torch.bfloat16)
    ours.set_policies(*policy)
    inputs = batch(config, B, T)
    kept_theirs = compiled_saved_bytes(theirs, *inputs, norm_fp32=False)
    kept_ours = compiled_saved_bytes(ours, *inputs, norm_fp32=False)
    if policy[1] == "full":
        assert kept_ours == kept_theirs
    else:
        assert kept_ours < kept_theirs - 2 * B * T * vocab  # no whole-batch bf16 logits kept
    assert compiled_saved_bytes(ours, *inputs) == kept_ours
    if policy[1] == "full":
        assert compiled_saved_bytes(theirs, *inputs) == kept_theirs + n_layer * 4 * B * T * n_embd


def test_compiled_d20_against_nanochats_published_peak():
    """nanochat's d20 speedrun (8 x H100, micro-batch 32, compiled, one micro-batch per step, torch
    2.8) peaked at 75,422.02 MiB allocated (the report.md its speedrun.sh writes, commit af82c3a).
    Its optimizers keep each state on one rank of the eight (DistAdamW shards every state, DistMuon
    keeps each matrix's momentum on its owner: nanochat/adamw.py and muon.py at fae3aca). onecard
    keeps whole tensors on owners too, and the planner counts its busiest card of eight, the one
    holding lm_head's moments (0.625 GiB where an even eighth is 0.34): the compiled model says
    79.3 GiB, 7.7 % over: inside the 10 % the issue tolerates above, not the 5 % it aims for. The
    eager model said 139.4 GiB."""
    config = GPTConfig.from_depth(20)
    recipe = Recipe(micro_batch=32, compile=True)  # baseline: fp32 weights, keep, full loss
    published = 75_422.02 * 2**20
    sharded = predict_memory(config, recipe, micro_steps=1, shards=8)
    assert sharded.optimizer == 2 * 4 * 65_536 * 1280  # lm_head's two fp32 moments
    eager = predict_memory(config, recipe.with_(compile=False), micro_steps=1).allocated
    assert 1.0 < sharded.allocated / published < 1.10
    assert eager / published > 1.8
