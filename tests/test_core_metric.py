"""CORE: on synthetic bundles with every task kind and few-shot setting, onecard's rendered tokens,
per-example choices and final score equal nanochat's own core_eval.py on the same model; bad
bundles are one-line errors; `onecard eval --task core` writes eval.json."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from onecard import core_metric as cm
from onecard.cli import main
from onecard.errors import UsageError
from onecard.weights import load_weights
from tests.reference import nanochat

TINY = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32",
        "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1", "--steps", "1"]
WORDS = ("the cat dog sat ran on a mat hat red blue big small tree house river stone light dark fast slow "
         "import def return print class self value list dict for in if else").split()
# (label, kind, shots, delimiter or None for the default, random baseline %)
TASKS = [("mc_0", "multiple_choice", 0, None, 25.0), ("mc_3", "multiple_choice", 3, "\nAnswer: ", 25.0),
         ("schema_0", "schema", 0, None, 50.0), ("schema_2", "schema", 2, " because ", 50.0),
         ("lm_0", "language_modeling", 0, "", 0.0), ("lm_2", "language_modeling", 2, None, 0.0)]


def phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def examples_of(kind, rng, greedy=None):
    out = []
    for i in range(8):
        if kind == "multiple_choice":
            stem = phrase(rng, 2)
            choices = [f"{stem} {phrase(rng, rng.randint(1, 3))}" for _ in range(rng.randint(2, 4))]
            if i % 5 == 0:
                choices.append(choices[0] + " too")  # a choice that extends another
            out.append({"query": phrase(rng, rng.randint(3, 8)) + "?", "choices": choices,
                        "gold": rng.randrange(len(choices))})
        elif kind == "schema":
            options = [phrase(rng, rng.randint(2, 6)) for _ in range(rng.randint(2, 3))]
            out.append({"context_options": options, "continuation": phrase(rng, rng.randint(1, 4)),
                        "gold": rng.randrange(len(options))})
        else:
            context = phrase(rng, rng.randint(3, 8))
            continuation = phrase(rng, rng.randint(1, 3))
            for _ in range(30 if greedy and i % 2 == 0 else 0):  # some that the model writes: both outcomes occur
                context = phrase(rng, rng.randint(3, 8))
                if written := greedy(context):
                    continuation = written
                    break
            trailing = "  \n" if i % 3 == 0 else ""  # trimmed away by the renderer
            out.append({"context": context + trailing, "continuation": continuation})
    return out


def write_bundle(folder, greedy=None, tasks=TASKS):
    rng = random.Random(0)
    (folder / "eval_data" / "synthetic").mkdir(parents=True)
    lines, meta = ["icl_tasks:"], ["Eval Task,Random baseline"]
    for label, kind, shots, delimiter, baseline in tasks:
        path = folder / "eval_data" / "synthetic" / f"{label}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in examples_of(kind, rng, greedy)))
        lines += [f"- label: {label}", f"  dataset_uri: synthetic/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}"]
        if delimiter is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(delimiter)}")
        meta.append(f"{label},{baseline}")
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")
    (folder / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two contending ones on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "run"
    assert main(["train", "--run-dir", str(path), *TINY]) == 0
    return path


@pytest.fixture(scope="module")
def loaded(run_dir):
    """The run's model with random weights: decisive logits, so that no verdict rests on how a
    batch of another shape rounds (a one-step model's logits are nearly flat)."""
    model, tokenizer, _ = load_weights(run_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def bundle(loaded, tmp_path_factory):
    from onecard.engine import Engine, Sampling
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, tools=False)

    def greedy(text):
        """What the model writes after `text` (0-shot, empty delimiter), if it encodes back the same."""
        ids = tokenizer.encode(text, prepend_bos=True)
        written = engine.complete(ids, Sampling(temperature=0, max_tokens=2))[0]
        continuation = tokenizer.decode(written)
        return continuation if tokenizer.encode(text + continuation, prepend_bos=True) == ids + written else None
    return write_bundle(tmp_path_factory.mktemp("bundle"), greedy)


def nanochat_data(task, max_per_task=None):
    """base_eval.py's loading: every line, shuffled with Random(1337), cut."""
    data = [json.loads(line.strip()) for line in task.path.read_text().splitlines()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task else data


@pytest.mark.parametrize("max_per_task", [None, 6])
def test_choices_and_score_equal_nanochats(loaded, bundle, max_per_task):
    core_eval = nanochat("fae3aca", "core_eval")
    reference = nanochat("fae3aca", "tokenizer").RustBPETokenizer(loaded[1].enc, "<|bos|>")
    model, tokenizer = loaded
    tasks = cm.load_bundle(bundle)
    assert {t.kind for t in tasks} == set(cm.KINDS) and {t.num_fewshot for t in tasks} == {0, 2, 3}
    ours, theirs, outcomes = [], [], set()
    for task in tasks:
        data = cm.read_examples(task, max_per_task)
        assert data == nanochat_data(task, max_per_task)
        meta = {"task_type": task.kind, "num_fewshot": task.num_fewshot, "continuation_delimiter": task.delimiter}
        score = cm.score_task(model, tokenizer, task, data)
        for idx, rows in enumerate(cm.task_rows(tokenizer, task, data)):
            # the same tokens and spans as nanochat's renderers and batchers
            shots = cm.fewshot_for(data, idx, task.num_fewshot)
            render = {"multiple_choice": core_eval.render_prompts_mc, "schema": core_eval.render_prompts_schema,
                      "language_modeling": core_eval.render_prompts_lm}[task.kind]
            batch = {"multiple_choice": core_eval.batch_sequences_mc, "schema": core_eval.batch_sequences_schema,
                     "language_modeling": core_eval.batch_sequences_lm}[task.kind]
            tokens, starts, ends = batch(reference, render(data[idx], task.delimiter, shots))
            assert [(r.tokens, r.start, r.end) for r in rows] == list(zip(tokens, starts, ends, strict=True))
            # the same verdict, and (multiple choice, schema) the same chosen option
            correct = core_eval.evaluate_example(idx, model, reference, data, "cpu", meta)
            assert score.correct[idx] == correct, (task.label, idx)
            outcomes.add((task.kind, correct))
            if task.kind != "language_modeling" and max_per_task is None:
                options = len(data[idx]["choices" if task.kind == "multiple_choice" else "context_options"])
                picked = [k for k in range(options) if core_eval.evaluate_example(
                    idx, model, reference, [*data[:idx], {**data[idx], "gold": k}, *data[idx + 1:]], "cpu", meta)]
                assert picked == [score.predictions[idx]], (task.label, idx)
        accuracy = core_eval.evaluate_task(model, reference, data, "cpu", meta)
        theirs.append((accuracy - 0.01 * task.random_baseline) / (1.0 - 0.01 * task.random_baseline))
        ours.append(score)
        assert score.accuracy == pytest.approx(accuracy, abs=1e-6)  # nanochat averages in float32
    assert cm.core_score(ours) == pytest.approx(sum(theirs) / len(theirs), abs=1e-6)
    if max_per_task is None:  # every kind had right and wrong answers: the comparison meant something
        assert outcomes == {(kind, ok) for kind in cm.KINDS for ok in (True, False)}


def test_centered_accuracy_and_core_by_hand():
    assert cm.centered(0.25, 25.0) == 0.0 and cm.centered(1.0, 25.0) == 1.0
    assert cm.centered(0.5, 0.0) == 0.5 and cm.centered(0.625, 50.0) == pytest.approx(0.25)
    scores = [cm.TaskScore("a", 0.5, 0.5, 10), cm.TaskScore("b", 0.25, 0.0, 10)]
    assert cm.core_score(scores) == 0.25


def test_scoring_picks_the_lowest_mean_loss(loaded):
    """A hand-made multiple-choice example: the choice the model itself continues with wins."""
    model, tokenizer = loaded
    prompt = "def the cat"
    ids = tokenizer.encode(prompt, prepend_bos=True)
    with torch.no_grad():
        best = int(model(torch.tensor([ids]))[0, -1].argmax())
        worst = int(model(torch.tensor([ids]))[0, -1].argmin())
    rows = [cm.Row(ids + [t], len(ids), len(ids) + 1) for t in (worst, best)]
    from onecard.scoring import score_rows
    scored = score_rows(model, rows, tokenizer.bos_id)
    assert worst != best and scored[1].losses.mean() < scored[0].losses.mean()
    assert scored[1].greedy and not scored[0].greedy


@pytest.mark.parametrize("breakage, says", [
    ("no-yaml", "core.yaml is missing"),
    ("no-csv", "eval_meta_data.csv is missing"),
    ("no-data", "mc_0.jsonl is missing"),
    ("bad-yaml", "cannot read"),
    ("no-tasks", "no icl_tasks"),
    ("bad-kind", "icl_task_type 'essay'"),
    ("no-baseline", "no random baseline for task 'mc_0'"),
    ("baseline-100", "below 100"),
    ("not-json", "line 2: not JSON"),
    ("gold-out", "gold 9 is not the index"),
    ("lm-missing", "needs the fields context, continuation"),
    ("too-few-for-shots", "asks for 3 few-shot examples but has only 2"),
    ("not-a-folder", "is not a folder"),
])
def test_bad_bundles_are_one_line_errors(tmp_path, breakage, says):
    folder = write_bundle(tmp_path / "b", tasks=[TASKS[0], TASKS[1], TASKS[4]])
    data = folder / "eval_data" / "synthetic"
    if breakage == "no-yaml":
        (folder / "core.yaml").unlink()
    elif breakage == "no-csv":
        (folder / "eval_meta_data.csv").unlink()
    elif breakage == "no-data":
        (data / "mc_0.jsonl").unlink()
    elif breakage == "bad-yaml":
        (folder / "core.yaml").write_text("icl_tasks: [\n")
    elif breakage == "no-tasks":
        (folder / "core.yaml").write_text("other: 1\n")
    elif breakage == "bad-kind":
        (folder / "core.yaml").write_text((folder / "core.yaml").read_text().replace("multiple_choice", "essay", 1))
    elif breakage == "no-baseline":
        (folder / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_3,25\nlm_0,0\n")
    elif breakage == "baseline-100":
        (folder / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_0,100\nmc_3,25\nlm_0,0\n")
    elif breakage == "not-json":
        lines = (data / "mc_0.jsonl").read_text().splitlines()
        (data / "mc_0.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    elif breakage == "gold-out":
        (data / "mc_0.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 9}) + "\n")
    elif breakage == "lm-missing":
        (data / "lm_0.jsonl").write_text(json.dumps({"context": "only"}) + "\n")
    elif breakage == "too-few-for-shots":
        lines = (data / "mc_3.jsonl").read_text().splitlines()
        (data / "mc_3.jsonl").write_text("\n".join(lines[:2]) + "\n")
    elif breakage == "not-a-folder":
        folder = tmp_path / "nothing"
    with pytest.raises(UsageError) as error:
        for task in cm.load_bundle(folder):
            cm.read_examples(task)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_eval_core_command_writes_results(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/eval_bundle here to fall back on
    bundle = write_bundle(tmp_path / "bundle")
    assert main(["eval", str(run_dir), "--task", "core", "--bundle", str(bundle), "--max-per-task", "5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "does not beat GPT-2 1.5B (0.2565)" in out or "beats GPT-2" in out
    record = json.loads((run_dir / "eval.json").read_text())
    core = record["tasks"]["core"]
    assert set(core["tasks"]) == {t[0] for t in TASKS} and core["partial"] and core["examples"] == 30
    assert math.isfinite(core["value"]) and core["reference_gpt2"] == 0.256525
    assert core["examples_per_s"] > 0
    assert main(["eval", str(run_dir), "--task", "core", "--device", "cpu"]) == 2  # no bundle
    err = capsys.readouterr().err
    assert "onecard data download eval-bundle" in err and len(err.strip().splitlines()) == 1


def test_bundle_found_once_and_read_once(run_dir, tmp_path, capsys, monkeypatch):
    """--bundle, else data/eval_bundle where it holds core.yaml: one resolver for the default tasks and
    the check; the bundle read before the model loads is the one scored; the common checks run once."""
    from onecard import evaluate

    monkeypatch.chdir(tmp_path)
    assert cm.find_bundle(None) is None and cm.find_bundle("given") == Path("given")
    write_bundle(tmp_path / cm.DEFAULT_BUNDLE, tasks=[TASKS[0], TASKS[2]])
    assert cm.find_bundle(None) == cm.DEFAULT_BUNDLE and cm.find_bundle("") == cm.DEFAULT_BUNDLE
    calls = {"load_bundle": 0, "check_common": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(cm, "load_bundle", counted("load_bundle", cm.load_bundle))
    monkeypatch.setattr(evaluate, "check_common", counted("check_common", evaluate.check_common))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": phrase(random.Random(4), 60)}) + "\n" for _ in range(300)))
    # no --task: bpb and, the default bundle being here, CORE
    assert main(["eval", str(run_dir), "--data", str(corpus), "--bpb-tokens", "256", "--max-per-task", "2",
                 "--device", "cpu"]) == 0
    core = json.loads((run_dir / "eval.json").read_text())["tasks"]["core"]
    assert core["bundle"] == str(cm.DEFAULT_BUNDLE) and set(core["tasks"]) == {"mc_0", "schema_0"}
    assert calls == {"load_bundle": 1, "check_common": 1}


def test_bpb_task_equals_nanochats_bits_per_byte(run_dir, tmp_path, capsys):
    """`--task bpb`: the held-out split's bits per byte, special tokens (every document's <|bos|>)
    counting no bytes, as nanochat's loss_eval.evaluate_bpb computes it on the same batches."""
    loss_eval = nanochat("fae3aca", "loss_eval")
    from onecard.data import Corpus
    from onecard.loader import TokenLoader

    rng = random.Random(3)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": phrase(rng, 60)}) + "\n" for _ in range(1500)))
    assert main(["eval", str(run_dir), "--task", "bpb", "--data", str(corpus), "--bpb-tokens", "2048",
                 "--batch-tokens", "1024", "--device", "cpu"]) == 0
    entry = json.loads((run_dir / "eval.json").read_text())["tasks"]["bpb"]
    assert entry["examples"] == 2048 and entry["unit"] == "tokens"
    model, tokenizer, _ = load_weights(run_dir)

    class Nanochat:  # the interface loss_eval calls
        def get_device(self):
            return torch.device("cpu")

        def __call__(self, x, y, loss_reduction="mean"):
            return model(x, y, loss_reduction=loss_reduction)
    loader = TokenLoader(Corpus(corpus), tokenizer, 32, model.config.sequence_len, split="val")
    theirs = loss_eval.evaluate_bpb(Nanochat(), iter(loader), 2, tokenizer.token_bytes())
    assert entry["value"] == pytest.approx(theirs, rel=1e-5)


def test_bpb_never_counts_a_token_twice_on_a_split_smaller_than_a_batch(run_dir, tmp_path, capsys):
    from onecard.data import Corpus
    from onecard.tokenizer import Tokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": phrase(random.Random(6), 60)}) + "\n" for _ in range(400)))
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    held = sum(len(tokenizer.encode(text, prepend_bos=True)) for _, text in Corpus(corpus).documents("val"))
    assert main(["eval", str(run_dir), "--task", "bpb", "--data", str(corpus), "--bpb-tokens", "65536",
                 "--batch-tokens", "65536", "--device", "cpu"]) == 0
    counted = json.loads((run_dir / "eval.json").read_text())["tasks"]["bpb"]["examples"]
    assert 0 < counted <= held < 65536
    (tmp_path / "short.jsonl").write_text((json.dumps({"text": "hi"}) + "\n") * 200)  # a few tokens held out
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--task", "bpb", "--data", str(tmp_path / "short.jsonl"),
                 "--device", "cpu"]) == 2
    assert "too little to measure bits per byte on" in capsys.readouterr().err


def test_bad_task_data_stops_before_scoring_and_finished_tasks_are_kept(run_dir, tmp_path, capsys, monkeypatch):
    from onecard import evaluate

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": phrase(random.Random(7), 60)}) + "\n" for _ in range(300)))
    mmlu = tmp_path / "mmlu.jsonl"
    row = {"question": "q?", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": "E"}
    mmlu.write_text(json.dumps(row) + "\n")
    (run_dir / "eval.json").unlink(missing_ok=True)
    ask = ["eval", str(run_dir), "--task", "bpb,mmlu", "--data", str(corpus), "--mmlu", str(mmlu),
           "--bpb-tokens", "256", "--device", "cpu"]
    assert main(ask) == 2  # its bad row is found before the model loads, not after bpb was measured
    said = capsys.readouterr()
    assert "answer 'E'" in said.err and "evaluating" not in said.out and not (run_dir / "eval.json").exists()
    mmlu.write_text(json.dumps({**row, "answer": 1}) + "\n")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "run_chat_task", interrupted)  # Ctrl-C during the second task
    assert main(ask) == 130
    assert set(json.loads((run_dir / "eval.json").read_text())["tasks"]) == {"bpb"}


def test_bpb_on_another_corpus_than_training_says_so(run_dir, tmp_path, capsys):
    """The held-out split is drawn within the corpus given; from other files than training read (a
    subfolder, one of its files) it may hold training text, which the user is told."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": phrase(random.Random(5), 60)}) + "\n" for _ in range(300)))
    args = ["--task", "bpb", "--bpb-tokens", "256", "--device", "cpu"]
    assert main(["eval", str(run_dir), "--data", str(corpus), *args]) == 0
    assert "note: --data is not the corpus this model trained on" in capsys.readouterr().err
    assert main(["eval", str(run_dir), *args]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("name, content, says", [("empty.jsonl", "", "holds only empty files"),
                                                 ("notes.md", "text", "is a .md file")])
def test_a_bpb_corpus_that_cannot_be_read_stops_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch,
                                                                      name, content, says):
    from onecard import weights

    def never(*_args, **_kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(weights, "load_weights", never)
    (tmp_path / name).write_text(content)
    assert main(["eval", str(run_dir), "--task", "bpb", "--data", str(tmp_path / name), "--device", "cpu"]) == 2
    assert says in capsys.readouterr().err
