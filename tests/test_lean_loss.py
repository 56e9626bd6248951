"""The chunked loss equals the full-logits loss, in value and gradients, without full logits."""

import pytest
import torch
import torch.nn.functional as F

from onecard.loss import chunked_cross_entropy
from onecard.model import GPTConfig, build_model

CONFIG = GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
ROWS = 24  # 2 x 32 = 64 rows: chunks of 24, 24 and a short 16


def tiny_model():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)  # large enough that the soft-cap bends some logits
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.05)
            block.mlp.c_proj.weight.normal_(0.0, 0.05)
    return model


def batch(ignore: str):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.sequence_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    if ignore == "some":
        y[0, :5] = -1
        y[1, 10:12] = -1
    elif ignore == "chunk":  # the whole second chunk (rows 24..47) ignored
        y.view(-1)[24:48] = -1
    return x, y


def run(model, loss_policy, x, y, reduction):
    model.set_policies("keep", loss_policy, loss_chunk_rows=ROWS)
    model.zero_grad(set_to_none=True)
    loss = model(x, y, loss_reduction=reduction)
    # a weighting that differs per row, so per-row gradients are checked too
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)
    (loss * weights).sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "chunk"])
def test_chunked_loss_and_gradients_equal_full(reduction, ignore):
    model = tiny_model()
    x, y = batch(ignore)
    full_loss, full_grads = run(model, "full", x, y, reduction)
    loss, grads = run(model, "chunked", x, y, reduction)
    assert loss.shape == full_loss.shape
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    for name, expected in full_grads.items():
        # float32 sums in another order: equal to ~1e-7 of the gradient's scale
        scale = expected.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-6 * scale, msg=name)
    if reduction == "none":
        assert (loss[y.reshape(-1) == -1] == 0).all()


def test_mean_is_over_non_ignored_targets_against_hand_computation():
    model = tiny_model()
    x, y = batch("some")
    model.set_policies("keep", "chunked", loss_chunk_rows=ROWS)
    with torch.no_grad():
        logits = model.lm_head(model.trunk(x)).float()
        capped = 15 * torch.tanh(logits / 15)
        per_row = -F.log_softmax(capped.view(-1, CONFIG.vocab_size), dim=-1)
        flat = y.reshape(-1)
        kept = flat != -1
        expected = per_row[kept.nonzero().squeeze(1), flat[kept]].mean()
        torch.testing.assert_close(model(x, y), expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_makes_more_than_one_chunk_of_logits():
    model = tiny_model()
    x, y = batch("none")
    hidden = model.trunk(x)
    rows_seen = []

    def head(h):
        rows_seen.append(h.shape[0])
        return model.logits(h)

    loss = chunked_cross_entropy(head, hidden, y, "mean", rows=ROWS)
    assert rows_seen == [24, 24, 16]  # forward: one chunk at a time
    loss.backward()
    assert sorted(rows_seen[3:]) == [16, 24, 24]  # backward recomputes each chunk once, alone


def test_all_ignored_gives_nan_like_cross_entropy():
    model = tiny_model()
    x, y = batch("none")
    y = torch.full_like(y, -1)
    model.set_policies("keep", "full")
    full = model(x, y)
    model.set_policies("keep", "chunked", loss_chunk_rows=ROWS)
    assert full.isnan() and model(x, y).isnan()
