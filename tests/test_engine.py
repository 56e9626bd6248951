"""The KV-cache engine decodes exactly as full recomputation does, runs the calculator tool,
streams whole characters, and samples reproducibly."""

import itertools

import pytest
import torch

from onecard.data import Corpus, iter_texts
from onecard.engine import Engine, Sampling, TextStream, sample_next
from onecard.model import GPTConfig, build_model
from onecard.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(iter_texts(Corpus.embedded(), 100_000), 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(2)
    config = GPTConfig(sequence_len=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def full_recompute_greedy(model, prompt, steps):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):  # no cache: the whole sequence each time
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("prompt", [[3, 1, 4, 1, 5], [7], list(range(20, 34))])
def test_greedy_with_the_cache_equals_full_recomputation(tok, model, prompt):
    """Three samples from one prefill, past the model's 16-token context (up to 44 positions)."""
    steps = 30
    engine = Engine(model, tok, tools=False)
    engine.stop_ids = set()  # decode every step, whatever the random weights write
    outputs = engine.complete(prompt, Sampling(temperature=0, max_tokens=steps), num_samples=3)
    expected = full_recompute_greedy(model, prompt, steps)
    assert outputs == [expected] * 3


def test_policies_do_not_change_sampling(tok, model):
    engine = Engine(model, tok, tools=False)
    engine.stop_ids = set()
    plain = engine.complete([1, 2, 3, 4], Sampling(temperature=0, max_tokens=8))
    try:
        for policy in ("selective", "full", "offload"):
            model.set_policies(policy, "chunked")
            assert engine.complete([1, 2, 3, 4], Sampling(temperature=0, max_tokens=8)) == plain
    finally:
        model.set_policies("keep", "full")


def test_the_same_seed_gives_the_same_samples(tok, model):
    engine = Engine(model, tok)
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.9, max_tokens=12, seed=7)
    first = engine.complete([5, 6, 7], sampling, num_samples=4)
    assert engine.complete([5, 6, 7], sampling, num_samples=4) == first
    assert len({tuple(o) for o in first}) > 1  # the samples differ from each other


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, Sampling(temperature=1.0, top_k=None, top_p=0.7), generator)[0] for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.7 needs the second token; the third is never drawn


@pytest.mark.parametrize("sampling", [Sampling(temperature=1e-300, top_k=None), Sampling(temperature=5e-324),
                                      Sampling(temperature=1.0, top_k=None, top_p=1e-300)],
                         ids=["temperature-1e-300", "temperature-5e-324", "top_p-1e-300"])
def test_vanishing_temperature_or_top_p_draws_the_most_likely_token(sampling):
    """A positive temperature or top_p too small for fp32 used to make the probabilities nan (or all
    zero), which multinomial refuses: in the limit both leave only the most likely token."""
    logits = torch.tensor([[1.0, 3.0, 2.5, -4.0], [0.5, -1.0, 0.0, 7.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, sampling, generator) == [1, 3]


def test_logits_that_are_not_finite_are_a_damaged_model():
    from onecard.errors import UsageError
    # one damaged row in a batch is enough; inf as much as nan (the soft-capped models never give either)
    damaged = torch.tensor([[0.5, 1.0], [float("nan"), 1.0]])
    for sampling, logits in itertools.product((Sampling(), Sampling(temperature=0), Sampling(top_p=0.5)),
                                              (damaged, damaged.flip(0), damaged.nan_to_num(nan=float("inf")))):
        with pytest.raises(UsageError, match="not finite numbers: its weights are damaged"):
            sample_next(logits, sampling, torch.Generator())


class Scripted(torch.nn.Module):
    """A stand-in model that writes a scripted token sequence (whatever the input), to drive the tools."""

    def __init__(self, model, script):
        super().__init__()
        self.inner, self.script, self.step = model, script, 0
        self.config, self.rotary_len, self.lm_head = model.config, model.rotary_len, model.lm_head

    def trunk(self, ids, cache):
        return self.inner.trunk(ids, cache)  # keep the cache advancing as a real model's

    def logits(self, hidden):
        out = torch.full((hidden.size(0), hidden.size(1), self.config.vocab_size), -1e9)
        out[:, :, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return out


def test_the_calculator_result_is_forced_into_the_stream(tok, model):
    special = tok.special_id
    script = [special("<|python_start|>"), *tok.encode("6*7"), special("<|python_end|>")]
    scripted = Scripted(model, script + [tok.encode("x")[0]] * 10 + [special("<|assistant_end|>")] * 50)
    engine = Engine(scripted, tok)
    out = engine.complete([tok.bos_id], Sampling(temperature=0, max_tokens=40))[0]
    text = tok.decode(out)
    assert "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>" in text


def test_streaming_yields_only_whole_characters(tok):
    stream = TextStream(tok)
    pieces = []
    data = "ça 🙂 日本"
    for token in tok.encode(data):
        pieces.append(stream.push(token))
    pieces.append(stream.flush())
    assert "".join(pieces) == data
    assert all("\ufffd" not in p for p in pieces)


def test_cache_bytes_counts_the_caches_the_engine_allocates(tok, model, monkeypatch):
    """The serve budget's figure against the tensors generate() really makes (prompt's cache, then
    the samples'), and the decode term bounds them from above by no more than the logits' share."""
    from onecard import engine as engine_module
    from onecard.engine import cache_bytes

    made = []
    real = engine_module.KVCache

    def recording(*args, **kwargs):
        cache = real(*args, **kwargs)
        made.append(cache.k.nbytes + cache.v.nbytes)
        return cache
    monkeypatch.setattr(engine_module, "KVCache", recording)
    prompt, steps, samples = [3, 1, 4, 1, 5], 9, 3
    list(Engine(model, tok, tools=False).generate(prompt, Sampling(max_tokens=steps), samples))
    assert len(made) == 2
    logits = samples * 3 * model.config.vocab_size * 4
    assert cache_bytes(model, len(prompt), steps, samples) == max(sum(made) + logits,
                                                                  made[0] + len(prompt) * 14 * 32 * 4)
