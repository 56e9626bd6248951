"""lm-evaluation-harness over onecard models: the three requests against a plain forward pass, and
harness tasks from local-path YAML on local data (multiple choice, perplexity, generation), through
the harness's own evaluator and through `onecard eval --lm-eval`. Skipped where lm-eval is absent
(it is in the `eval` extra, not in `test`: it pulls datasets, scikit-learn, scipy, pandas)."""

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")

from onecard.errors import UsageError  # noqa: E402
from onecard.lm_eval_model import OnecardLM, pick_device, run_harness  # noqa: E402
from onecard.model import GPTConfig, build_model  # noqa: E402
from onecard.tokenizer import Tokenizer  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat by the river " * 8
MC = [{"question": "the cat sat on the", "choices": [" mat", " sky", " river"], "answer": 0},
      {"question": "one two three", "choices": [" four", " dog"], "answer": 0},
      {"question": "red green", "choices": [" blue", " ran"], "answer": 1}]
TASKS = {
    "onecard_local_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_target": "answer",
                         "doc_to_choice": "choices", "metric_list": [{"metric": "acc"}], "file": "mc.jsonl"},
    "onecard_local_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                          "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
                          "file": "text.jsonl"},
    "onecard_local_gen": {"output_type": "generate_until", "doc_to_text": "{{q}}:", "doc_to_target": "{{a}}",
                          "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6},
                          "metric_list": [{"metric": "exact_match"}], "file": "text.jsonl"},
}


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([TEXT], 280)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                                  n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # decisive logits; nanochat's init zeroes the head
    return OnecardLM(model=model.eval(), tokenizer=tokenizer, batch_tokens=64)


def request(*args):
    return SimpleNamespace(args=args)


def full_logprobs(lm, ids):
    """log P(ids[i] | ids[:i]) for every i >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_equals_a_forward_pass(lm):
    tok = lm.tokenizer
    for context, continuation in [("the cat sat on", " the mat"), ("the quick brown ", "fox"), ("", "the dog")]:
        (logprob, greedy), = lm.loglikelihood([request(context, continuation)])
        ctx = [tok.bos_id, *tok.encode(context.rstrip())]
        whole = [tok.bos_id, *tok.encode(context + continuation)]
        assert whole[:len(ctx)] == ctx
        expected = full_logprobs(lm, whole)[len(ctx) - 1:]
        assert logprob == pytest.approx(float(expected.sum()), rel=1e-4)
        with torch.no_grad():
            argmax = lm.model(torch.tensor([whole]))[0].argmax(-1)[len(ctx) - 1:-1]
        assert greedy == bool((argmax == torch.tensor(whole[len(ctx):])).all())
    # a batch of many gives the same as one at a time
    pairs = [(TEXT[:i], TEXT[i:i + 7]) for i in range(5, 80, 7)]
    together = lm.loglikelihood([request(*p) for p in pairs])
    alone = [lm.loglikelihood([request(*p)])[0] for p in pairs]
    assert [g for _, g in together] == [g for _, g in alone]
    assert [v for v, _ in together] == pytest.approx([v for v, _ in alone], rel=1e-4)


def test_rolling_predicts_every_token_once(lm):
    short = "the cat sat"
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(short)]
    assert len(ids) <= lm.max_length
    (value,) = lm.loglikelihood_rolling([request(short)])
    assert value == pytest.approx(float(full_logprobs(lm, ids).sum()), rel=1e-4)
    long = TEXT[:200]
    rows = lm.rolling_rows(long)
    assert sum(r.end - r.start for r in rows) == len(lm.tokenizer.encode(long)) and len(rows) > 2
    assert all(len(r.tokens) <= lm.max_length + 1 and r.start >= 1 for r in rows)  # at most max_length of context
    assert rows[-1].start > 1  # the last window keeps full context even when it scores few tokens


def test_generate_until_stops_at_the_stop_string(lm):
    free, = lm.generate_until([request("the cat", {"until": [], "max_gen_toks": 6})])
    assert free
    stop = free[2:4] if len(free) >= 4 else free[-1]
    cut, = lm.generate_until([request("the cat", {"until": [stop], "max_gen_toks": 6})])
    assert cut == free[:free.index(stop)]


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": TEXT[:k], "q": "say a", "a": "a"}) + "\n"
                                                 for k in (40, 300)))
    for name, spec in TASKS.items():
        spec = dict(spec)
        config = {"task": name, "dataset_path": "json", "test_split": "test",
                  "dataset_kwargs": {"data_files": {"test": str(tmp_path / spec.pop("file"))}}, **spec}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return tmp_path


def test_harness_tasks_from_local_yaml(lm, task_dir):
    results = run_harness(lm.model, lm.tokenizer, list(TASKS), include_path=str(task_dir))
    assert set(results) == set(TASKS)
    # multiple choice: the harness's accuracy is what our own loglikelihoods say (it puts its target
    # delimiter, a space, before each choice)
    expected = sum(max(range(len(r["choices"])), key=lambda k: lm.loglikelihood(
        [request(r["question"], " " + r["choices"][k])])[0][0]) == r["answer"] for r in MC) / len(MC)
    assert results["onecard_local_mc"]["acc,none"] == pytest.approx(expected)
    assert results["onecard_local_ppl"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in results["onecard_local_gen"]


def test_eval_command_runs_harness_tasks(lm, task_dir, tmp_path, capsys, monkeypatch):
    from onecard.cli import main

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--device", "cpu", "--depth", "1", "--vocab-size", "300",
                 "--tokenizer-chars", "20000", "--seq-len", "32", "--micro-batch", "2", "--total-batch", "128",
                 "--eval-every", "0", "--eval-batches", "1", "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--lm-eval", "onecard_local_mc", "--lm-eval-include", str(task_dir),
                 "--device", "cpu"]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert record["tasks"]["lm-eval:onecard_local_mc"]["examples"] == 3
    capsys.readouterr()

    class Tasks:  # the harness's index of its 14,000 tasks takes seconds: a stand-in that knows none
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = []
    monkeypatch.setattr("lm_eval.tasks.TaskManager", Tasks)
    assert main(["eval", str(run), "--lm-eval", "no_such_task_anywhere", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no task 'no_such_task_anywhere'" in err and len(err.strip().splitlines()) == 1


def test_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [pick_device(n) for n in (None, "auto", "cpu", "cuda", "cuda:0", "CUDA:1")] == ["cpu"] * 6  # no card
    with pytest.raises(UsageError, match="unknown --device 'tpu'") as error:
        pick_device("tpu")
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match="unknown --device 'cudax'"):
        pick_device("cudax")  # not a harness name for a card
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [pick_device(n) for n in ("auto", "cuda", "cuda:1")] == ["cuda", "cuda", "cuda:1"]
