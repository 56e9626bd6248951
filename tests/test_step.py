"""TrainStep alone: what it counts and how it reports running out of memory."""

import numpy as np
import pytest
import torch

from onecard.distributed import World
from onecard.measure import time_recipe_steps
from onecard.model import GPTConfig, build_model
from onecard.recipe import NAMED
from onecard.sft_data import ConversationBatches, Conversations
from onecard.step import TrainStep

TINY = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


def test_a_step_counts_every_ranks_tokens_when_their_widths_differ():
    """Conversations are padded per micro-batch, so ranks' micro-batches differ in width. Each rank
    draws every rank's batches (one stream, taken in turns): the step counts them all. It used to
    count its own times the number of ranks."""
    lengths = [5, 30, 7, 9, 28, 6, 12, 20]
    items = [(np.arange(n, dtype=np.int32) % 50, np.ones(n, dtype=np.int8)) for n in lengths]
    data = Conversations(items, {}, "test")
    batches = ConversationBatches(data, 2, 32, pad_id=0, shuffle=False)
    model = build_model(TINY)
    step = TrainStep(model, _optimizer(model), "cpu", world=World(rank=0, size=2))
    step.forward_backward(batches, 2, lambda: False)
    widths = [max(lengths[i:i + 2]) - 1 for i in range(0, 8, 2)]  # inputs drop the last token
    assert step.tokens == sum(2 * w for w in widths) == 2 * (29 + 8 + 27 + 19)  # rank 0's x 2 said 112


def _optimizer(model):
    from onecard.family import build_optimizer
    return build_optimizer(model, NAMED["baseline"].with_(micro_batch=2, seq_len=32))


@pytest.mark.parametrize("where", ["warm-up forward", "update"])
def test_a_benchmark_row_records_running_out_of_memory_anywhere_in_the_step(monkeypatch, where):
    """The benchmarks' rows say "out of memory" where a card is too small; a warm-up step or an
    update that ran out used to end the whole benchmark instead."""
    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "update":
        monkeypatch.setattr("onecard.optim.Optimizers.step", out_of_memory)
    else:
        monkeypatch.setattr(TrainStep, "forward_backward", out_of_memory)
    row = time_recipe_steps(TINY, NAMED["baseline"].with_(micro_batch=2, seq_len=32), 1, 2, "cpu")
    assert row["outcome"] == "out of memory" and "Tried to allocate 2.00 GiB" in row["error"]


@pytest.mark.parametrize("next_compile", [False, True], ids=["eager", "whole"])
def test_a_model_from_a_per_block_step_does_not_keep_its_compiled_blocks(monkeypatch, next_compile):
    """pretrain.train returns its model and fine_tune (session.prepare) takes one: a step after a
    per-block compiled one (grads=cpu, activations=offload) must not go on calling that step's
    compiled blocks, whether it runs eagerly (--no-compile) or compiles the model whole."""
    import onecard.step
    from onecard.family import build_optimizer

    calls = []

    def fake_compile(module, **_):
        def run(*args, **kwargs):
            calls.append(module)
            return module(*args, **kwargs)
        return run

    monkeypatch.setattr(onecard.step.torch, "compile", fake_compile)
    model = build_model(TINY)
    per_block = NAMED["offload"].with_(micro_batch=2, seq_len=32, compile=True)
    model.set_policies(per_block.activations, per_block.loss)
    TrainStep(model, build_optimizer(model, per_block), "cpu", compile_model=True)
    assert model.compiled_blocks is not None
    model.set_policies("keep", "full")
    step = TrainStep(model, _optimizer(model), "cpu", compile_model=next_compile)
    calls.clear()
    inputs = torch.randint(0, 64, (2, 32))
    step.step_model(inputs, inputs).backward()
    assert model.compiled_blocks is None
    assert calls == ([model] if next_compile else [])  # the whole model's compile only, no block's
