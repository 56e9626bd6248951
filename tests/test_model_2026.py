"""The nanochat-2026 family against nanochat 92d63d4's own code (tests/reference.py imports it, or
the test skips saying why): same weights -> same logits, same seed -> same init, same counts and
FLOPs; and the sliding-window attention paths against the window mask written out."""

import math

import pytest
import torch

from onecard.family import build_model
from onecard.model_2026 import flex_window, sdpa_window, window_mask
from onecard.model_config import GPTConfig, flops_per_token, param_counts, scaling_params, window_sizes
from tests.reference import nanochat

SMALL = dict(sequence_len=512, vocab_size=100, n_head=4, n_kv_head=2, n_embd=64, arch="nanochat-2026")


def reference_model(gpt, config: GPTConfig, device: str = "cpu"):
    ref_config = gpt.GPTConfig(sequence_len=config.sequence_len, vocab_size=config.vocab_size,
                               n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                               n_embd=config.n_embd, window_pattern=config.window_pattern)
    with torch.device(device):
        return gpt.GPT(ref_config)


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, so that zero-initialized parts (projections, smear) count too."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("n_layer", [2, 5])
def test_same_weights_same_logits_as_nanochat(n_layer):
    gpt = nanochat("92d63d4", "gpt")
    config = GPTConfig(n_layer=n_layer, **SMALL)
    ref = reference_model(gpt, config)
    ref.init_weights()
    scramble(ref, n_layer)
    ours = build_model(config, init=False)
    ours.load_state_dict(ref.state_dict(), strict=True)  # keys and shapes equal nanochat's
    assert ref.window_sizes == [(w, 0) for w in window_sizes(config)]
    assert 128 in window_sizes(config)  # a short window, which the 300 tokens below exceed
    idx = torch.randint(0, config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(idx), ours(idx)
        assert got.shape == expected.shape == (2, 300, config.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        targets = idx.roll(-1, 1)
        torch.testing.assert_close(ours(idx, targets), ref(idx, targets), rtol=1e-5, atol=1e-6)


def test_same_seed_same_initialization_as_nanochat():
    gpt = nanochat("92d63d4", "gpt")
    config = GPTConfig(n_layer=3, **SMALL)
    ref = reference_model(gpt, config)
    torch.manual_seed(7)
    ref.init_weights()
    ours = build_model(config, init=False)
    torch.manual_seed(7)
    ours.init_weights()
    theirs = ref.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    torch.testing.assert_close(ours.cos, ref.cos, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [4, 12, 24, 26])
def test_counts_and_flops_equal_nanochat(depth):
    gpt = nanochat("92d63d4", "gpt")
    config = GPTConfig.from_depth(depth, vocab_size=32768, sequence_len=2048, arch="nanochat-2026")
    ref = reference_model(gpt, config, device="meta")
    counts, theirs = param_counts(config), ref.num_scaling_params()
    assert counts["wte"] == theirs["wte"] and counts["lm_head"] == theirs["lm_head"]
    assert counts["value_embeds"] == theirs["value_embeds"]
    assert counts["blocks"] == theirs["transformer_matrices"]
    assert counts["scalars"] == theirs["scalars"]
    assert sum(counts.values()) == theirs["total"]
    assert scaling_params(config) == theirs["transformer_matrices"] + theirs["lm_head"]
    assert flops_per_token(config) == ref.estimate_flops()
    assert build_model(config, device="meta").num_params() == theirs["total"]


def test_padded_vocabulary_and_odd_sizes():
    gpt = nanochat("92d63d4", "gpt")
    config = GPTConfig(n_layer=3, sequence_len=200, vocab_size=1001, n_head=2, n_kv_head=1, n_embd=48,
                       window_pattern="SL", arch="nanochat-2026")
    assert config.padded_vocab == 1024
    ref = reference_model(gpt, config, device="meta")
    assert flops_per_token(config) == ref.estimate_flops()
    assert sum(param_counts(config).values()) == ref.num_scaling_params()["total"]
    shapes = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def explicit_window_attention(q, k, v, window):
    """Softmax attention with the window mask written out, in float64; k and v repeated for GQA."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~window_mask(q.size(2), k.size(2), window), float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


@pytest.mark.parametrize("t_q,t_k,window", [(300, 300, 128), (300, 300, 512), (1, 300, 128), (40, 300, 128),
                                            (7, 7, 2)])
def test_masked_sdpa_equals_window_mask(t_q, t_k, window):
    g = torch.Generator().manual_seed(t_q + window)
    q = torch.randn(2, 4, t_q, 16, generator=g)
    k, v = torch.randn(2, 2, t_k, 16, generator=g), torch.randn(2, 2, t_k, 16, generator=g)
    torch.testing.assert_close(sdpa_window(q, k, v, window), explicit_window_attention(q, k, v, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_equals_window_mask():
    # The CUDA training path's mask_mod and block mask, run uncompiled on the CPU (speed on CUDA,
    # compiled, is not measured here).
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 256, 16, generator=g)
    k, v = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    try:
        got = flex_window(q, k, v, 100, compiled=False)
    except Exception as error:  # noqa: BLE001 - an old PyTorch without CPU FlexAttention
        pytest.skip(f"FlexAttention does not run on this CPU build: {error}")
    torch.testing.assert_close(got, explicit_window_attention(q, k, v, 100), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_cache_decoding_equals_the_full_forward():
    # prefill 150 tokens, then decode one at a time past the 128-token window: windows, value
    # embeddings, smear (from the cache) and backout all take part
    config = GPTConfig(n_layer=3, **{**SMALL, "sequence_len": 128})
    torch.manual_seed(0)
    model = build_model(config)
    scramble(model, 5)
    idx = torch.randint(0, config.vocab_size, (1, 170), generator=torch.Generator().manual_seed(2))
    full = model(idx)
    from onecard.model import KVCache
    cache = KVCache(config, 1, 170, "cpu", torch.float32)
    logits = [model.logits(model.trunk(idx[:, :150], cache))]
    for t in range(150, 170):
        logits.append(model.logits(model.trunk(idx[:, t:t + 1], cache)))
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
