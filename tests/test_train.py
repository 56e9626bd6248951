"""Bits per byte by hand, and a short real training run on the embedded corpus."""

import math

import pytest
import torch

from onecard.data import Corpus
from onecard.errors import UsageError
from onecard.model import GPTConfig
from onecard.recipe import Recipe
from onecard.tokenizer import Tokenizer
from onecard.train import TrainSettings, evaluate_bpb, grad_accum_steps, train
from onecard.weights import load_weights


class FixedLoss(torch.nn.Module):
    """Per-position loss = 1 + target/10, so every term of the sum is known by hand."""

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return (1.0 + targets.float() / 10).view(-1)


def test_bits_per_byte_hand_computed():
    token_bytes = torch.tensor([0, 1, 1, 1, 1, 3, 1, 2])  # id 0 is a special token (0 bytes)
    batches = [(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[5, 0, 7, -1]]))]
    # counted: target 5 (loss 1.5, 3 bytes) and target 7 (loss 1.7, 2 bytes); the special token and
    # the ignored -1 count neither loss nor bytes: 3.2 nats over 5 bytes.
    expected = 3.2 / (math.log(2) * 5)
    # the losses are fp32
    assert evaluate_bpb(FixedLoss(), batches, token_bytes, "cpu") == pytest.approx(expected, rel=1e-6)


def test_total_batch_must_be_whole_micro_batches():
    assert grad_accum_steps(4096, 8, 128) == 4
    with pytest.raises(UsageError, match="use 4096 or 5120"):
        grad_accum_steps(4100, 8, 128)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    corpus = Corpus.embedded()
    from onecard.data import iter_texts
    tokenizer = Tokenizer.train(iter_texts(corpus, 400_000), 512)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    run_dir = tmp_path_factory.mktemp("run")
    settings = TrainSettings(run_dir=run_dir, steps=40, total_batch=1024, seed=3, eval_every=0, eval_batches=4,
                             sample_tokens=8)
    result = train(config, tokenizer, corpus, Recipe(micro_batch=8, seq_len=64), settings, log=lambda *_: None)
    return result


def test_short_cpu_run_lowers_validation_bpb(tiny_run):
    # 40 steps of 1024 tokens: validation bits per byte must fall by at least 25 % from the start.
    start, end = tiny_run["val_bpb_start"], tiny_run["val_bpb_end"]
    assert end < 0.75 * start, (start, end)


def test_run_directory_reloads_to_the_same_model(tiny_run):
    run_dir = tiny_run["run_dir"]
    assert (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists()
    model, tokenizer, info = load_weights(run_dir)
    assert info["layout"] == "onecard"
    idx = torch.randint(0, tokenizer.vocab_size, (1, 16))
    trained = tiny_run["model"].eval()
    torch.testing.assert_close(model(idx), trained(idx))
