"""grads=cpu folds gradients on a worker thread (grad_fold.py): the sums are bit-identical to an
in-order fp32 sum, worker errors surface in the caller, a full staging pool makes the hook wait,
and no worker thread outlives its optimizer."""

import gc
import threading
import time

import pytest
import torch

import onecard.grad_fold as grad_fold
from onecard.grad_fold import GradFolder
from onecard.model import GPTConfig, build_model
from onecard.optim import build_optimizer
from onecard.recipe import NAMED, Recipe

CONFIG = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
MICRO = 3  # micro-batches per step
WORKER = "onecard-grad-fold"


def tiny_model(recipe: Recipe, device: str = "cpu"):
    torch.manual_seed(0)
    model = build_model(CONFIG, device)
    with torch.no_grad():  # no zero-initialized weights: every parameter gets a gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    model.set_policies(recipe.activations, recipe.loss, loss_chunk_rows=40)
    return model


def batches(n: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (n, 2, CONFIG.sequence_len + 1), generator=g).to(device)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def record_grads(model) -> dict:
    """Each parameter's gradients in the order autograd makes them (registered before the
    optimizer's hook, so it sees every gradient before the fold takes it)."""
    seen = {p: [] for p in model.parameters()}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: seen[q].append(q.grad.detach().clone()))
    return seen


def in_order_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """The reference: the micro-batches' gradients summed in fp32 on the CPU, in order."""
    total = grads[0].to("cpu", torch.float32)
    for g in grads[1:]:
        total = total + g.to("cpu", torch.float32)
    return total


def use_folder(opt, folder: GradFolder) -> None:
    for slot in opt.slots:
        if slot.folder is not None:
            slot.folder = folder


@pytest.fixture
def slow_folds(monkeypatch):
    """Every fold takes a few milliseconds: a buffer read before its folds are done shows."""
    fold = grad_fold.fold_into

    def slow(target, source, first):
        time.sleep(0.002)
        fold(target, source, first)

    monkeypatch.setattr(grad_fold, "fold_into", slow)


def worker_threads() -> int:
    return sum(t.name == WORKER and t.is_alive() for t in threading.enumerate())


def check_folded_sums(device: str, recipe: Recipe, folder: GradFolder | None = None) -> None:
    model = tiny_model(recipe, device)
    seen = record_grads(model)
    opt = build_optimizer(model, recipe)
    if folder is not None:
        use_folder(opt, folder)
    for step in range(2):
        for x, y in batches(MICRO, device):
            (model(x, y) / MICRO).backward()
            opt.accumulate()
        for p in model.parameters():
            slot = next(s for s in opt.slots if s.param is p)
            assert len(seen[p]) == MICRO * (step + 1)
            # slot.grad() waits for the folds still queued (accumulate() does not)
            assert torch.equal(slot.grad(), in_order_sum(seen[p][-MICRO:])), f"step {step}"
        opt.zero_grad()


@pytest.mark.parametrize("name", ["offload", "offload-max"])
def test_folded_buffers_equal_the_in_order_fp32_sum_bit_for_bit(name, slow_folds):
    check_folded_sums("cpu", NAMED[name])


def train(recipe: Recipe, steps: int = 3) -> list[torch.Tensor]:
    model = tiny_model(recipe)
    opt = build_optimizer(model, recipe)
    data = batches(MICRO * steps)
    for step in range(steps):
        for x, y in data[step * MICRO:(step + 1) * MICRO]:
            (model(x, y) / MICRO).backward()
            opt.accumulate()
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()
    masters = [slot.master for slot in opt.slots if slot.master is not None]
    return [p.detach().clone() for p in model.parameters()] + masters


def test_training_with_cpu_gradients_equals_fp32_gradients_on_the_device(slow_folds):
    """grads=cpu (queued folds) against grads=fp32 (buffers on the model's device, folded inline)."""
    offload = NAMED["offload"]
    on_device = offload.with_(grads="fp32")
    for a, b in zip(train(offload), train(on_device), strict=True):
        assert torch.equal(a, b)


def test_a_failed_fold_is_raised_by_the_first_reader_and_the_next_step_is_clean(monkeypatch):
    recipe = NAMED["offload"]
    model = tiny_model(recipe)
    seen = record_grads(model)
    opt = build_optimizer(model, recipe)
    fold, calls = grad_fold.fold_into, []

    def failing(target, source, first):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise ArithmeticError("fold failed")
        fold(target, source, first)

    monkeypatch.setattr(grad_fold, "fold_into", failing)
    x, y = batches(1)[0]
    model(x, y).backward()  # the hook only queues: backward itself does not see the error
    opt.accumulate()  # nor does accumulate, which does not wait
    with pytest.raises(ArithmeticError, match="fold failed"):
        opt.clip_grad_norm(1.0)  # the first reader of the buffers
    assert set(calls) == {WORKER}  # the folds ran on the worker, the error came out here
    opt.zero_grad()  # raised once: rewinding the step does not raise it again
    for p in seen:
        seen[p].clear()
    model(x, y).backward()
    opt.accumulate()
    for slot in opt.slots:
        assert torch.equal(slot.grad(), in_order_sum(seen[slot.param]))


def test_folds_queued_into_one_buffer_run_in_submit_order(slow_folds):
    """Several micro-batches queued before a drain: copy first, then the adds, in order."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(1000, generator=g) * 10.0 ** k for k in (3, -2, 1, -4, 2)]
    folder = GradFolder(staging_buffers=len(grads))
    target = torch.full((1000,), 7.0)
    for i, grad in enumerate(grads):
        folder.submit(target, grad, first=i == 0)
    folder.drain()
    assert torch.equal(target, in_order_sum(grads))
    folder.close()


def test_drain_raises_what_the_worker_hit():
    folder = GradFolder()
    folder.submit(torch.zeros(3), torch.ones(4), first=True)  # shapes that do not fold
    with pytest.raises(RuntimeError):
        folder.drain()
    folder.drain()  # reported once
    folder.close()


def test_one_staging_buffer_makes_the_hook_wait_for_the_worker(monkeypatch):
    release = threading.Event()
    fold = grad_fold.fold_into

    def gated(target, source, first):
        release.wait()
        fold(target, source, first)

    monkeypatch.setattr(grad_fold, "fold_into", gated)
    folder = GradFolder(staging_buffers=1)
    target = torch.zeros(5)
    folder.submit(target, torch.full((5,), 1.0), first=True)  # takes the only staging buffer
    second = threading.Thread(target=folder.submit, args=(target, torch.full((5,), 2.0), False))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting for the worker to give the buffer back
    release.set()
    second.join()
    folder.drain()
    assert torch.equal(target, torch.full((5,), 3.0))
    folder.close()


def test_one_staging_buffer_still_folds_bit_for_bit(slow_folds):
    check_folded_sums("cpu", NAMED["offload"], GradFolder(staging_buffers=1))


def test_no_worker_thread_outlives_its_optimizer():
    gc.collect()  # optimizers other tests dropped stop their workers now, not in the middle of this count
    before = worker_threads()
    recipe = NAMED["offload"]
    runs = []
    for _ in range(4):
        model = tiny_model(recipe)
        opt = build_optimizer(model, recipe)
        x, y = batches(1)[0]
        model(x, y).backward()
        opt.accumulate()
        runs.append((model, opt))
    assert worker_threads() == before + 4
    untouched = build_optimizer(tiny_model(recipe), recipe)  # started on the first fold only
    assert worker_threads() == before + 4
    del runs, model, opt, untouched
    gc.collect()
    assert worker_threads() == before


def test_close_stops_the_worker_and_a_new_fold_starts_it_again():
    before = worker_threads()
    folder = GradFolder()
    target = torch.zeros(2)
    folder.submit(target, torch.ones(2), first=True)
    folder.close()  # folds what was queued, then stops
    assert worker_threads() == before and torch.equal(target, torch.ones(2))
    folder.submit(target, torch.ones(2), first=False)
    folder.drain()
    assert torch.equal(target, torch.full((2,), 2.0))
    folder.close()
    assert worker_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned staging path needs a CUDA device")
@pytest.mark.parametrize("staging", [None, (2, 4096)], ids=["default", "small-chunks"])
def test_cuda_folds_equal_the_in_order_fp32_sum_bit_for_bit(staging, slow_folds):
    """Through pinned staging buffers; small-chunks: 2 buffers of 4 KiB, so gradients go in many
    chunks and the hook waits for the worker."""
    folder = None if staging is None else GradFolder(*staging)
    check_folded_sums("cuda", NAMED["offload"], folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_a_16_bit_gradient_widened_chunk_by_chunk_adds_the_bits_of_the_mixed_add(monkeypatch, dtype, contiguous):
    """fold_into widens 16-bit gradients to fp32 a chunk at a time before adding (faster on the CPU);
    the reference is PyTorch's own mixed-dtype add_, over chunks that do not divide the tensor."""
    monkeypatch.setattr(grad_fold, "FOLD_CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    source = (torch.randn(70, 50, generator=g) * 3).to(dtype)
    if not contiguous:
        source = (torch.randn(50, 70, generator=g) * 3).to(dtype).t()
    start = torch.randn(70, 50, generator=g) * 1e3
    widened, mixed = start.clone(), start.clone()
    grad_fold.fold_into(widened, source, first=False)
    mixed.add_(source)
    assert torch.equal(widened, mixed)
    assert grad_fold._scratch().numel() == 1000  # the chunk it was cut into


def test_folds_that_do_not_widen_exactly_keep_the_plain_add():
    """An fp32 gradient, or a bf16 buffer, is added as before (widening is exact only into fp32)."""
    g = torch.Generator().manual_seed(0)
    for target, source in [(torch.randn(300, generator=g), torch.randn(300, generator=g)),
                           (torch.randn(300, generator=g).bfloat16(), torch.randn(300, generator=g))]:
        expected = target.clone().add_(source)
        grad_fold.fold_into(target, source, first=False)
        assert torch.equal(target, expected)
