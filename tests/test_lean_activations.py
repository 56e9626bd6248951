"""Activation policies (selective / full recompute, offload) give the plain model's gradients."""

import pytest
import torch

from onecard.errors import UsageError
from onecard.model import GPTConfig, build_model

CONFIG = GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def tiny_model():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():  # nanochat zeroes the output layers; give them weights so every gradient flows
        for name, p in model.named_parameters():
            if not p.any():
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.sequence_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_and_grads(model, activations):
    model.set_policies(activations, "full")
    model.zero_grad(set_to_none=True)
    x, y = batch()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["selective", "full", "offload"])
def test_policy_gradients_equal_plain_gradients(policy):
    model = tiny_model()
    plain_loss, plain = loss_and_grads(model, "keep")
    loss, grads = loss_and_grads(model, policy)
    # Recompute reruns the same float32 operations, offload copies bytes: equal to rounding.
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert grads.keys() == plain.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # the comparison is not vacuous
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_bytes(model, activations) -> tuple[int, int]:
    """Bytes autograd saves outside recompute regions during the trunk's forward, parameters excluded."""
    model.set_policies(activations, "full")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    x, _ = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.trunk(x)
    return total, model.offloaded_bytes


def test_policies_change_what_autograd_keeps():
    model = tiny_model()
    keep, _ = saved_bytes(model, "keep")
    selective, _ = saved_bytes(model, "selective")
    full, _ = saved_bytes(model, "full")
    offload_here, offloaded = saved_bytes(model, "offload")
    # selective drops the MLP's saved tensors (norm, c_fc, ReLU², c_proj inputs: 11·n_embd per token
    # per block, more than attention keeps); full drops every block's; what remains is the trunk's
    # embedding norm and final norm.
    assert full < selective < keep
    tokens, width = 2 * CONFIG.sequence_len, CONFIG.n_embd
    mlp_saved = CONFIG.n_layer * tokens * (width + width + 3 * 4 * width) * 4  # fp32, see above
    assert keep - selective >= mlp_saved * 0.9
    # offload: its own hooks take every non-parameter saved tensor, exactly what keep saves
    assert offload_here == 0 and offloaded == keep


def test_bad_policies_are_usage_errors():
    model = tiny_model()
    with pytest.raises(UsageError, match="activations policy 'some'"):
        model.set_policies("some", "full")
    with pytest.raises(UsageError, match="loss=chunked"):
        model.set_policies("keep", "fused")  # CPU: no Triton kernel, and the message names the way out
    assert (model.activations, model.loss) == ("keep", "full")
