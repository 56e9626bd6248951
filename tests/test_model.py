"""The model against published counts and against a plainly written float64 reference."""

import math

import pytest
import torch

from onecard.errors import UsageError
from onecard.model import GPTConfig, build_model, flops_per_token, parse_model_name


def test_published_parameter_counts_on_meta_device():
    # docs/architecture.md#parameter-counts: d20 = 560,988,160 and d32 = 1,879,048,192 parameters.
    for depth, expected in [(20, 560_988_160), (32, 1_879_048_192)]:
        model = build_model(GPTConfig.from_depth(depth), device="meta")
        assert next(model.parameters()).is_meta
        assert sum(p.numel() for p in model.parameters()) == expected


def test_flops_per_token_formula():
    # Published d32 figure (docs/architecture.md#flops-per-token): 1.20796e10.
    d32 = GPTConfig.from_depth(32)
    assert f"{flops_per_token(d32):.5e}" == "1.20796e+10"
    # d20 by hand: width 1280, 10 heads of 128; non-embedding = 20 blocks of 12·1280² plus lm_head.
    width, vocab, layers = 1280, 65536, 20
    non_embedding = layers * 12 * width * width + vocab * width
    attention = 12 * layers * 10 * 128 * 2048
    assert flops_per_token(GPTConfig.from_depth(20)) == 6 * non_embedding + attention
    model = build_model(GPTConfig.from_depth(20), device="meta")
    assert model.estimate_flops() == 6 * non_embedding + attention


def test_state_dict_keys_and_shapes_match_nanochat():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=2, n_kv_head=1, n_embd=128)
    state = build_model(config, device="meta").state_dict()
    d, v, kv = 128, 300, 64
    expected = {"transformer.wte.weight": (v, d), "lm_head.weight": (v, d)}
    for i in range(3):
        expected |= {
            f"transformer.h.{i}.attn.c_q.weight": (d, d),
            f"transformer.h.{i}.attn.c_k.weight": (kv, d),
            f"transformer.h.{i}.attn.c_v.weight": (kv, d),
            f"transformer.h.{i}.attn.c_proj.weight": (d, d),
            f"transformer.h.{i}.mlp.c_fc.weight": (4 * d, d),
            f"transformer.h.{i}.mlp.c_proj.weight": (d, 4 * d),
        }
    assert {k: tuple(t.shape) for k, t in state.items()} == expected


def test_depth_dial_and_names():
    c = GPTConfig.from_depth(20)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (1280, 10, 10, 128)
    assert GPTConfig.from_depth(3).n_head == 2  # width 192 -> ceil(192/128) heads... of 96 channels
    assert parse_model_name("D32") == 32
    for bad in ["d0", "x12", "d", "32"]:
        with pytest.raises(UsageError):
            parse_model_name(bad)
    with pytest.raises(UsageError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3, n_kv_head=3)
    with pytest.raises(UsageError):
        GPTConfig(n_layer=0)
    for bad in (True, 1.0, "2"):  # a config.json's true is not a layer count
        with pytest.raises(UsageError, match="n_layer must be a positive integer"):
            GPTConfig(n_layer=bad)


def test_init_follows_nanochat():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=500, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_proj.weight.abs().sum() == 0
    # c_fc: fan_in 128, fan_out 512 -> std 1/sqrt(128); c_q: 1/sqrt(128) as well.
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)


# ---- an independent float64 reference, written plainly from docs/architecture.md#model

def ref_rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def ref_rotary(x, positions, head_dim):
    # x: (T, H, D). Half-split: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos
    half = head_dim // 2
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        for i in range(half):
            theta = positions[t] / (10000 ** (2 * i / head_dim))
            # the model keeps its tables in bf16: round cos/sin the same way
            c = torch.tensor(math.cos(theta)).bfloat16().double()
            s = torch.tensor(math.sin(theta)).bfloat16().double()
            x1, x2 = x[t, :, i], x[t, :, i + half]
            out[t, :, i] = x1 * c + x2 * s
            out[t, :, i + half] = -x1 * s + x2 * c
    return out


def reference_logits(state, config, idx):
    w = {k: v.double() for k, v in state.items()}
    T = idx.shape[0]
    H, KV, D = config.n_head, config.n_kv_head, config.head_dim
    x = ref_rms(w["transformer.wte.weight"][idx])
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        h = ref_rms(x)
        q = (h @ w[p + "attn.c_q.weight"].T).view(T, H, D)
        k = (h @ w[p + "attn.c_k.weight"].T).view(T, KV, D)
        v = (h @ w[p + "attn.c_v.weight"].T).view(T, KV, D)
        q, k = ref_rms(ref_rotary(q, range(T), D)), ref_rms(ref_rotary(k, range(T), D))
        y = torch.zeros(T, H, D, dtype=torch.float64)
        for head in range(H):
            kv_head = head // (H // KV)
            scores = q[:, head] @ k[:, kv_head].T / math.sqrt(D)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            y[:, head] = torch.softmax(scores, -1) @ v[:, kv_head]
        x = x + y.reshape(T, -1) @ w[p + "attn.c_proj.weight"].T
        h = ref_rms(x)
        x = x + torch.relu(h @ w[p + "mlp.c_fc.weight"].T) ** 2 @ w[p + "mlp.c_proj.weight"].T
    logits = ref_rms(x) @ w["lm_head.weight"].T
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_forward_matches_float64_reference(n_kv_head):
    torch.manual_seed(1)
    config = GPTConfig(sequence_len=16, vocab_size=97, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32)
    model = build_model(config).double()
    with torch.no_grad():  # the zero-initialized outputs would hide most of the network
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
        model.lm_head.weight.normal_(0, 2.0)  # large enough that the soft-cap matters
    idx = torch.randint(0, 97, (2, 12))
    logits = model(idx)
    for row in range(2):
        ref = reference_logits(model.state_dict(), config, idx[row])
        torch.testing.assert_close(logits[row], ref, rtol=1e-9, atol=1e-9)
    assert logits.abs().max() > 5  # the soft-cap regime was exercised
    # the loss is the mean cross-entropy with -1 ignored
    targets = torch.randint(0, 97, (2, 12))
    targets[0, :5] = -1
    ref_loss = torch.nn.functional.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = -(ref_loss * (targets >= 0)).sum() / (targets >= 0).sum()
    torch.testing.assert_close(model(idx, targets).double(), expected, rtol=1e-6, atol=1e-6)  # loss in fp32


def test_norm_runs_outside_autocast_in_its_input_dtype(monkeypatch):
    """torch >= 2.12 puts rms_norm on CUDA autocast's fp32 list, which would make the residual stream
    fp32; onecard's norm leaves autocast first, so it runs in the input's dtype under any policy."""
    import torch.nn.functional as F

    from onecard.model import norm

    seen = []
    real = F.rms_norm

    def spy(x, shape, weight=None, eps=None):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(x, shape, weight, eps)

    monkeypatch.setattr(F, "rms_norm", spy)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert seen == [False] and y.dtype == torch.bfloat16
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps))
    torch.testing.assert_close(y, expected.bfloat16())  # computed in fp32 inside, float32's epsilon
