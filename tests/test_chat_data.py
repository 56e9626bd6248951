"""Chat data end to end: `onecard data download smoltalk|arc|mmlu|gsm8k|chat` fetches the datasets'
parquet files (against a local server that injects faults), `onecard sft --data FOLDER` trains on
their train files as conversations, and `onecard eval` finds their test files where the download put
them."""

import io
import json
from argparse import Namespace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_download import FAST, FaultServer

from onecard import datasources as ds
from onecard.chat_tasks import LETTERS, render_mc
from onecard.cli import main
from onecard.conversations import BadConversation, normalize, render
from onecard.download import DownloadError
from onecard.evaluate import TASK_FOLDERS, default_tasks
from onecard.fetch import download_files
from onecard.sft_data import Source, load
from onecard.task_chats import as_conversation, solution_parts
from onecard.tokenizer import Tokenizer

# nanochat's own example of a GSM8K row (karpathy/nanochat tasks/gsm8k.py, its docstring)
WENG = {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                    "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                  "$<<0.2*50=10>>10.\n#### 10"}


def arc_row(i: int) -> dict:
    return {"id": f"q{i}", "question": f"Which number is {i}?",
            "choices": {"text": [str(i), str(i + 1), str(i + 2)], "label": ["A", "B", "C"]}, "answerKey": "A"}


def mmlu_row(i: int) -> dict:
    return {"question": f"What is {i} + 1?", "subject": "math", "choices": [str(i), str(i + 1), "x", "y"],
            "answer": 1}


def gsm8k_row(i: int) -> dict:
    return {"question": f"Tom has {i} apples and buys {i} more. How many?",
            "answer": f"He has {i}+{i} = <<{i}+{i}={2 * i}>>{2 * i} apples.\n#### {2 * i}"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [json.dumps([arc_row(i), gsm8k_row(i), mmlu_row(i)]) for i in range(300)]
    return Tokenizer.train(iter(texts + [WENG["question"] + WENG["answer"]]), 300)


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=8)
    return sink.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(parquet_bytes(rows))
    return path


# ---------------------------------------------------------------- task rows as conversations

def test_a_gsm8k_solution_becomes_calculator_calls_as_nanochat_makes_them(tokenizer):
    # nanochat's rule: <<expr=result>> -> a python part (expr) and a python_output part (result)
    assert solution_parts(WENG["answer"]) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"}, {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"}, {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"}]
    assert solution_parts("<<2*3>>x") == [{"type": "python", "text": "2*3"}, {"type": "python_output", "text": ""},
                                          {"type": "text", "text": "x"}]  # no '=': an empty output
    messages = normalize(as_conversation(WENG))
    assert messages[0] == {"role": "user", "content": WENG["question"]}
    rendered = render(tokenizer, messages)
    learned = tokenizer.decode([t for t, m in zip(rendered.ids, rendered.mask, strict=True) if m])
    # the model learns to write the expressions and the text, never the calculator's results
    assert "12/60" in learned and "0.2*50" in learned and "#### 10" in learned
    assert "<|python_start|>12/60<|python_end|><|output_start|>" not in learned
    assert learned.count("<|output_start|>") == 0 and learned.endswith("<|assistant_end|>")


def test_multiple_choice_rows_are_the_prompt_eval_asks_and_the_letter():
    arc = as_conversation(arc_row(3))["messages"]
    assert arc == [{"role": "user", "content": render_mc("Which number is 3?", ("A", "B", "C"), ["3", "4", "5"])},
                   {"role": "assistant", "content": "A"}]
    mmlu = as_conversation(mmlu_row(3))["messages"]
    assert mmlu[0]["content"] == render_mc("What is 3 + 1?", LETTERS, ["3", "4", "x", "y"])
    assert mmlu[1]["content"] == "B"
    assert as_conversation({"train": mmlu_row(3)}) == {"messages": mmlu}  # auxiliary_train's wrapper
    with pytest.raises(BadConversation, match="not a usable ARC row: answerKey 'E'"):
        as_conversation({**arc_row(1), "answerKey": "E"})
    with pytest.raises(BadConversation, match="not a usable GSM8K row: the answer has no '#### N'"):
        as_conversation({"question": "q", "answer": "no final answer"})
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert as_conversation(conversation) is conversation


# ---------------------------------------------------------------- sft reads a downloaded folder

def task_folder(root: Path) -> Path:
    """data/arc as the download lays it out: train and test splits of both subsets."""
    arc = root / "arc"
    write_parquet(arc / "ARC-Easy/train-00000-of-00001.parquet", [arc_row(i) for i in range(30)])
    write_parquet(arc / "ARC-Easy/test-00000-of-00001.parquet", [arc_row(100 + i) for i in range(7)])
    write_parquet(arc / "ARC-Challenge/train-00000-of-00001.parquet", [arc_row(200 + i) for i in range(20)])
    write_parquet(arc / "ARC-Challenge/test-00000-of-00001.parquet", [arc_row(300 + i) for i in range(5)])
    return arc


def test_sft_reads_a_folders_train_files_only(tmp_path, tokenizer):
    arc = task_folder(tmp_path)
    train, val = load([Source(arc)], tokenizer, 512, val_fraction=0.0)
    assert len(train) == 50 and not val.counts  # 30 + 20 training rows; no test row
    questions = {tokenizer.decode(ids.tolist()) for ids, _ in train.items}
    assert not any(f"Which number is {n}?" in q for q in questions for n in (100, 300))
    # the same row number in two subsets' same-named files falls in the split by its own path
    _, val = load([Source(arc)], tokenizer, 512, val_fraction=0.5)
    held = {tokenizer.decode(ids.tolist()) for ids, _ in val.items}
    easy = {i for i in range(30) if any(f"Which number is {i}?" in q for q in held)}
    hard = {i - 200 for i in range(200, 220) if any(f"Which number is {i}?" in q for q in held)}
    assert easy != hard  # not the same rows of both files
    mixed = tmp_path / "mine"
    write_parquet(mixed / "a.parquet", [gsm8k_row(i) for i in range(4)])
    write_parquet(mixed / "test.parquet", [gsm8k_row(i) for i in range(3)])
    write_parquet(mixed / "run/other.parquet", [gsm8k_row(i) for i in range(5)])  # only train* files are sought deeper
    assert len(load([Source(mixed)], tokenizer, 512, val_fraction=0.0)[0]) == 4  # no train*: all but test*
    only_test = tmp_path / "only"
    write_parquet(only_test / "test-0.parquet", [gsm8k_row(0)])
    with pytest.raises(Exception, match="a folder with no training files"):
        load([Source(only_test)], tokenizer, 512)


def test_a_parquet_file_of_neither_shape_is_refused_with_its_columns(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "x.parquet", [{"text": "hello"}])
    with pytest.raises(Exception, match="neither a 'messages' nor a 'conversations' column, "
                                        "nor a task's columns .it has text"):
        load([Source(path)], tokenizer, 64)


def test_sft_trains_on_downloaded_task_folders(tmp_path, capsys):
    from test_sft_chat import SFT, TINY

    base = tmp_path / "base"
    tiny = [*TINY]
    tiny[tiny.index("--seq-len") + 1] = "256"  # a multiple-choice prompt is longer than the suite's 32
    tiny[tiny.index("--total-batch") + 1] = "512"
    assert main(["train", "--run-dir", str(base), *tiny]) == 0
    arc = task_folder(tmp_path / "data")
    gsm8k = tmp_path / "data/gsm8k"
    write_parquet(gsm8k / "main/train-00000-of-00001.parquet",
                  [gsm8k_row(i) for i in range(24)] + [{"question": "q", "answer": "none"}])
    write_parquet(gsm8k / "main/test-00000-of-00001.parquet", [gsm8k_row(500)])
    capsys.readouterr()
    assert main(["sft", "--from", str(base), "--data", str(arc), "--data", f"{gsm8k}:0.5", "--run-dir",
                 str(tmp_path / "sft"), "--steps", "2", *SFT]) == 0
    said = capsys.readouterr().out
    assert "1 not a usable GSM8K row" in said and "cut at the context" not in said  # counted, not fatal
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------- eval finds the test files

def test_eval_finds_downloaded_test_files_in_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = Namespace(lm_eval=None, arc_easy=None, arc_challenge=None, mmlu=None, gsm8k=None, humaneval=None)
    monkeypatch.setattr("onecard.chat_tasks.humaneval_package_file", lambda: None)
    with pytest.raises(Exception, match="`onecard data download chat` fetches their test files"):
        default_tasks(args, chat_model=True)
    write_parquet(Path(TASK_FOLDERS["gsm8k"]) / "test-00000-of-00001.parquet", [gsm8k_row(1)])
    task_folder(Path("data"))
    assert default_tasks(args, chat_model=True) == ["arc-easy", "arc-challenge", "gsm8k"]
    from onecard.chat_tasks import load_problems
    assert len(load_problems("arc-easy", TASK_FOLDERS["arc-easy"])) == 7  # the test file, not the train one


# ---------------------------------------------------------------- the download

SET = ds.FileSet(name="tasks", title="Tasks (test)", repo="test/tasks",
                 files=("E/train-e.parquet", "E/test-e.parquet", "main/train-g.parquet"),
                 columns=(("question", "choices", "answerKey"), ("question", "answer")), approx_bytes=30e3,
                 use="for the tests")


@pytest.fixture
def server():
    s = FaultServer({"train-e.parquet": parquet_bytes([arc_row(i) for i in range(40)]),
                     "test-e.parquet": parquet_bytes([arc_row(i) for i in range(9)]),
                     "train-g.parquet": parquet_bytes([gsm8k_row(i) for i in range(30)])})
    yield s
    s.close()


def fetch(server, folder: Path, base: str = "/resolve/{name}") -> None:
    download_files(SET, folder, FAST, base_url=server.url + base, say=lambda _: None, stream=io.StringIO())


def test_downloads_every_file_under_its_path_verified_through_faults(server, tmp_path):
    server.faults = {"train-e.parquet": ["drop", "503"], "train-g.parquet": ["truncate"]}
    fetch(server, tmp_path / "tasks")
    for path in SET.files:
        assert (tmp_path / "tasks" / path).read_bytes() == server.files[Path(path).name]
    assert not list((tmp_path / "tasks").rglob("*.part*"))
    before = len(server.requests)
    fetch(server, tmp_path / "tasks")
    assert len(server.requests) == before  # a rerun finds every file complete
    (tmp_path / "tasks/E/test-e.parquet").write_bytes(b"PAR1 damaged")
    fetch(server, tmp_path / "tasks")
    assert (tmp_path / "tasks/E/test-e.parquet.damaged").is_file()
    assert (tmp_path / "tasks/E/test-e.parquet").read_bytes() == server.files["test-e.parquet"]


def test_a_file_with_the_wrong_columns_or_a_wrong_checksum_never_counts(server, tmp_path):
    server.files["test-e.parquet"] = parquet_bytes([{"text": "not a task"}])
    with pytest.raises(DownloadError, match="1 of 3 files could not be fetched: E/test-e.parquet: .*columns text"):
        fetch(server, tmp_path / "t")
    assert not (tmp_path / "t/E/test-e.parquet").exists()
    server.files["test-e.parquet"] = parquet_bytes([arc_row(1)])
    server.linked_sha["test-e.parquet"] = "0" * 64
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch(server, tmp_path / "t")
    assert not (tmp_path / "t/E/test-e.parquet").exists() and (tmp_path / "t/E/train-e.parquet").is_file()


def test_cli_chat_data_dry_run_and_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "download", "chat", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for file_set in ds.FILE_SETS.values():
        assert f"{file_set.title}: {len(file_set.files)} files" in out and f"in data/{file_set.name}:" in out
    assert "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet" in out
    assert not Path("data").exists()
    assert main(["data", "download", "arc", "--shards", "2"]) == 2
    assert "arc comes whole: drop --shards" in capsys.readouterr().err
    assert main(["data", "download", "chat", "--dir", "x"]) == 2
    assert "download the sets one by one for --dir" in capsys.readouterr().err


def test_cli_downloads_one_set_from_a_mirror(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ds, "FILE_SETS", {**ds.FILE_SETS, SET.name: SET})
    assert main(["data", "download", "tasks", "--dir", str(tmp_path / "d"), "--base-url",
                 server.url + "/main/{name}", "--timeout", "2"]) == 0
    assert "done: 3 files fetched and verified" in capsys.readouterr().out
    del server.files["train-g.parquet"]
    (tmp_path / "d/main/train-g.parquet").unlink()
    assert main(["data", "download", "tasks", "--dir", str(tmp_path / "d"), "--base-url",
                 server.url + "/main/{name}", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "HTTP 404" in err


# ---------------------------------------------------------------- review: folders as they are on a real disk

def test_eval_never_scores_a_task_folder_without_its_test_file(tmp_path, monkeypatch):
    from onecard.chat_tasks import load_problems
    from onecard.evaluate import data_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("onecard.chat_tasks.humaneval_package_file", lambda: None)
    args = Namespace(lm_eval=None, arc_easy=None, arc_challenge=None, mmlu=None, gsm8k=None, humaneval=None)
    main_dir = Path(TASK_FOLDERS["gsm8k"])
    write_parquet(main_dir / "train-00000-of-00001.parquet", [gsm8k_row(i) for i in range(5)])
    # the test file's download was cut: its .part and the .part.json the downloader resumes from
    (main_dir / "test-00000-of-00001.parquet.part").write_bytes(b"PAR1")
    (main_dir / "test-00000-of-00001.parquet.part.json").write_text('{"url": "x", "size": 9}')
    with pytest.raises(Exception, match="holds no complete test file"):
        data_path(args, "gsm8k")
    with pytest.raises(Exception, match="`onecard data download chat` fetches their test files"):
        default_tasks(args, chat_model=True)  # not GSM8K scored on its train split
    write_parquet(main_dir / "test-00000-of-00001.parquet", [gsm8k_row(100)])
    assert len(load_problems("gsm8k", data_path(args, "gsm8k"))) == 1  # the side file is not task data


def test_sft_folder_follows_linked_folders_and_train_folders_but_not_download_state(tmp_path, tokenizer):
    elsewhere = write_parquet(tmp_path / "big_disk/gsm8k/main/train-00000-of-00001.parquet",
                              [gsm8k_row(i) for i in range(6)]).parents[1]
    data = tmp_path / "data"
    write_parquet(data / "arc/ARC-Easy/train-00000-of-00001.parquet", [arc_row(i) for i in range(4)])
    (data / "gsm8k").symlink_to(elsewhere)
    (data / "arc/loop").symlink_to(data)  # a link back up is not followed
    assert len(load([Source(data)], tokenizer, 512, val_fraction=0.0)[0]) == 10
    mine = tmp_path / "mine"
    write_parquet(mine / "train/part-0.parquet", [gsm8k_row(i) for i in range(3)])
    write_parquet(mine / "test/part-0.parquet", [gsm8k_row(i) for i in range(2)])
    assert len(load([Source(mine)], tokenizer, 512, val_fraction=0.0)[0]) == 3
    (mine / "train/part-1.parquet.part.json").write_text('{"url": "x", "size": 9}')
    train, _ = load([Source(mine)], tokenizer, 512, val_fraction=0.0)
    assert len(train) == 3 and not train.counts  # the downloader's side file is no conversation
    (mine / "train/part-1.parquet.part").write_bytes(b"PAR1")
    with pytest.raises(Exception, match="is an unfinished download"):
        load([Source(mine)], tokenizer, 512)


def test_the_split_is_the_same_however_the_folder_is_named(tmp_path, tokenizer):
    write_parquet(tmp_path / "gsm8k/main/train-00000-of-00001.parquet", [gsm8k_row(i) for i in range(60)])
    splits = [load([Source(p)], tokenizer, 512, val_fraction=0.2)[1] for p in
              (tmp_path, tmp_path / "gsm8k", tmp_path / "gsm8k/main")]
    held = [sorted(ids.tobytes() for ids, _ in val.items) for val in splits]
    assert held[0] == held[1] == held[2] and held[0]


def test_mmlu_auxiliary_train_with_another_column_and_help_names_folders(capsys):
    messages = as_conversation({"train": mmlu_row(3)})
    assert as_conversation({"train": mmlu_row(3), "__index_level_0__": 0}) == messages
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "or a folder: its train* files" in " ".join(capsys.readouterr().out.split())


def test_hf_endpoint_names_a_mirror_for_every_hugging_face_download(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    download_files(SET, tmp_path / "m", FAST, say=lambda _: None, stream=io.StringIO())
    assert {path for path, _ in server.requests} == {f"/datasets/test/tasks/resolve/main/{p}" for p in SET.files}
    assert ds.FINEWEB_EDU.url(3) == f"{server.url}/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/" \
                                    "shard_00003.parquet"
    assert ds.EVAL_BUNDLE.url.startswith("https://karpathy-public.s3")  # not on Hugging Face: unchanged
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.com")
    assert main(["data", "download", "gsm8k", "--dry-run"]) == 2
