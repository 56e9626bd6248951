"""`onecard sft` fine-tunes a base run on conversations (mixtures, bad input, exact resume) and
`onecard chat` talks to the result."""

import io
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from onecard.chat import Chat
from onecard.cli import main
from onecard.conversations import render
from onecard.engine import Engine, Sampling
from onecard.errors import UsageError
from onecard.sft_data import ConversationBatches, Source, load, packed_rows, report
from onecard.weights import load_weights

TINY = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32",
        "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1", "--steps", "2"]


def conversation(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me see: "},
                                                           {"type": "python", "text": f"{i} + {i}"},
                                                           {"type": "python_output", "text": str(2 * i)},
                                                           {"type": "text", "text": f" it is {2 * i}."}]}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(40)))
    return path


SFT = ["--device", "cpu", "--batch", "4", "--micro-batch", "2", "--eval-batches", "1", "--eval-every", "0"]


def test_sft_then_chat(base, chats, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--from", str(base), "--data", str(chats), "--run-dir", str(out), *SFT, "--steps", "3"]) == 0
    said = capsys.readouterr().out
    assert "training and" in said and "onecard chat" in said
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "sft" and config["init_from"] == str(base)
    assert config["train"]["matrix_lr"] == pytest.approx(0.02 * 0.02)  # nanochat's fraction for user data
    assert main(["chat", str(out), "-p", "What is 3 + 3?", "--max-tokens", "8", "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert said.out.strip() and "base model" not in said.err
    assert main(["chat", str(base), "-p", "What is 3 + 3?", "--max-tokens", "2", "--device", "cpu"]) == 0
    assert "is a base model, not fine-tuned on conversations" in capsys.readouterr().err
    # resuming it from another base model is refused: the checkpoint was trained from the first
    import shutil
    other = shutil.copytree(base, tmp_path / "other-base")
    assert main(["sft", "--from", str(other), "--data", str(chats), "--run-dir", str(out), *SFT, "--steps", "4"]) == 2
    assert f"started from {base} -> {other}" in capsys.readouterr().err
    # pre-training on from the chat model: its batch of conversations is not taken for tokens
    assert main(["train", "--init-from", str(out), "--run-dir", str(tmp_path / "more"), "--device", "cpu",
                 "--steps", "1", "--dry-run"]) == 0, capsys.readouterr().err
    assert "--total-batch" not in capsys.readouterr().err


def fine_tune_run(base, chats, run_dir, **changes):
    from onecard.recipe import named_recipe
    from onecard.run import TrainSettings
    from onecard.sft import fine_tune

    model, tokenizer, _ = load_weights(base)
    train_set, val_set = load([Source(chats)], tokenizer, 33)
    settings = TrainSettings(run_dir=run_dir, steps=6, total_batch=4, eval_every=0, eval_batches=1,
                             matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, sample_prompt="What is 2 + 2?")
    for key, value in changes.items():
        setattr(settings, key, value)
    recipe = named_recipe("bf16", seq_len=32, micro_batch=2)  # stochastic rounding: every RNG must be restored
    return fine_tune(model, tokenizer, train_set, val_set, recipe, settings, log=lambda *_: None)


def test_sft_stopped_and_resumed_equals_uninterrupted(base, chats, tmp_path):
    straight = fine_tune_run(base, chats, tmp_path / "straight")
    first = fine_tune_run(base, chats, tmp_path / "resumed", stop_after=3)
    assert first["stopped"] == "limit" and first["step"] == 3
    second = fine_tune_run(base, chats, tmp_path / "resumed")
    assert second["stopped"] is None and second["step"] == 6
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), \
        load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in straight["history"]]
    assert losses[3:] == [r["loss"] for r in second["history"]]


def test_mixture_weights_and_the_split(base, tmp_path):
    _, tokenizer, _ = load_weights(base)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(50)))
    two.write_text("".join(json.dumps(conversation(100 + i)) + "\n" for i in range(50)))
    alone = {path: load([Source(path)], tokenizer, 64, val_fraction=0.1) for path in (one, two)}
    train, val = load([Source.parse(f"{one}:2"), Source.parse(str(two))], tokenizer, 64, val_fraction=0.1)
    assert len(train) == 2 * len(alone[one][0]) + len(alone[two][0])  # two epochs of one, one of two
    assert len(val) == len(alone[one][1]) + len(alone[two][1])  # the split does not depend on the weight
    half, _ = load([Source.parse(f"{one}:0.5")], tokenizer, 64, val_fraction=0.0)
    assert len(half) == 25 and len({item[0].tobytes() for item in half.items}) == 25  # half of the 50, by hash
    again, _ = load([Source.parse(f"{one}:0.5")], tokenizer, 64, val_fraction=0.0)
    assert [a[0].tobytes() for a in again.items] == [h[0].tobytes() for h in half.items]  # the same half
    more, _ = load([Source.parse(f"{one}:2.25")], tokenizer, 64, val_fraction=0.0)
    assert len(more) == 2 * 50 + 12  # round(0.25 x 50); it used to be each one kept with that chance
    tiny, small_val = load([Source.parse(f"{one}:0.01")], tokenizer, 64, val_fraction=0.1)
    assert len(tiny) == 1  # at least one
    train, val = load([Source(one)], tokenizer, 64)  # 50 at 2 %: none held out by the hash
    assert val.borrowed and "1 validation conversation (a training one: too few to hold one out)" in \
        report(train, val)
    for bad in ("a.jsonl:0", "a.jsonl:-1", "a.jsonl:1000"):
        with pytest.raises(UsageError, match="weight"):
            Source.parse(bad)


def test_padding_masks_and_packing(base, chats):
    _, tokenizer, _ = load_weights(base)
    train, _ = load([Source(chats)], tokenizer, 33, val_fraction=0.0)
    inputs, targets = ConversationBatches(train, 3, 32, tokenizer.bos_id, shuffle=False).next_batch()
    assert inputs.shape == targets.shape and inputs.shape[0] == 3
    first = train.items[0]
    learned = [int(t) for t, m in zip(first[0][1:], first[1][1:], strict=True) if m]
    assert [int(t) for t in targets[0] if t >= 0] == learned  # only the assistant's tokens are targets
    long, _ = load([Source(chats)], tokenizer, 129, val_fraction=0.0)
    packed = ConversationBatches(long, 2, 128, tokenizer.bos_id, shuffle=False, pack=True)
    inputs, targets = packed.next_batch()
    assert inputs.shape == (2, 128)
    assert int((inputs[0] == tokenizer.bos_id).sum()) >= 2  # several conversations in one row
    state = packed.state_dict()
    after = packed.next_batch()
    packed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(packed.next_batch(), after, strict=True))
    for width in (129, 40, 300):  # an epoch's rows, as sft counts them for its steps, are what the packer fills
        one_row, rows = ConversationBatches(long, 1, width - 1, tokenizer.bos_id, shuffle=False, pack=True), 0
        while one_row.epoch == 0 and one_row.index < len(long):
            one_row.next_batch()
            rows += 1
        assert packed_rows(long, width) == rows


def test_chat_commands_and_stop(base):
    model, tokenizer, _ = load_weights(base)
    out = io.StringIO()
    chat = Chat(Engine(model, tokenizer), tokenizer, Sampling(max_tokens=4), None, out=out)
    chat.reply("hello")
    assert len(chat.messages) == 2 and chat.messages[0] == {"role": "user", "content": "hello"}
    assert chat.command("/temperature 0") and chat.sampling.temperature == 0
    assert chat.command("/temperature nan") and chat.sampling.temperature == 0  # refused, said so
    assert chat.command("/topk 3") and chat.sampling.top_k == 3
    assert chat.command("/clear") and chat.messages == []
    assert not chat.command("/quit")
    assert "(/temperature:" in out.getvalue()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt
    chat.engine.complete = interrupted  # Ctrl-C during a reply stops the reply, not the chat (at a terminal)
    chat.reply("again", stoppable=True)
    assert "[stopped]" in out.getvalue() and len(chat.messages) == 2


class ScriptedEngine:
    """Replies with the given texts in turn and keeps every prompt it was given."""

    def __init__(self, model, replies):
        self.model, self.replies, self.prompts = model, list(replies), []

    def complete(self, prompt, sampling, on_text):
        self.prompts.append(prompt)
        on_text(0, self.replies.pop(0))


def test_chat_history_keeps_blank_replies_and_calculator_tokens(base):
    model, tokenizer, _ = load_weights(base)
    engine = ScriptedEngine(model, [" ", "Sum: <|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>", "ok"])
    out = io.StringIO()
    chat = Chat(engine, tokenizer, Sampling(), None, out=out)
    for text in ("hi", "hello again", "and?"):  # a blank reply used to end the chat with a traceback
        chat.reply(text)
    assert "Sum: [calculator: 2+2 = 4]" in out.getvalue()
    last = engine.prompts[-1]
    for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"):
        assert last.count(tokenizer.special_id(name)) == 1, name  # not spelled out as text
    assert last.count(tokenizer.special_id("<|assistant_end|>")) == 2


def test_a_prompt_longer_than_the_context_says_so(base):
    model, tokenizer, _ = load_weights(base)
    chat = Chat(ScriptedEngine(model, []), tokenizer, Sampling(), None, out=io.StringIO())
    with pytest.raises(UsageError, match="the message is .* tokens, more than the model's context of"):
        chat.reply("word " * 4 * model.rotary_len)
    chat = Chat(ScriptedEngine(model, []), tokenizer, Sampling(), "word " * 4 * model.rotary_len, out=io.StringIO())
    with pytest.raises(UsageError, match="the system message and this message are .* tokens, more than"):
        chat.reply("hi")  # it said 'the message is' thousands of tokens, of a message of one word


def test_a_malformed_line_is_named_unless_skipped(base, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    # the second line nests deeper than Python's JSON parser recurses: not JSON either
    path.write_text(json.dumps(conversation(1)) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n"
                    + "".join(json.dumps(conversation(i)) + "\n" for i in range(2, 12)) + "{not json\n"
                    + json.dumps(conversation(12)) + "\n")
    assert main(["sft", "--from", str(base), "--data", str(path), "--run-dir", str(tmp_path / "r"), *SFT]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "--skip-bad" in err and len(err.strip().splitlines()) == 1
    assert main(["sft", "--from", str(base), "--data", str(path), "--run-dir", str(tmp_path / "r"), *SFT,
                 "--skip-bad", "--steps", "1", "--batch", "2", "--dry-run"]) == 0
    # the file goes on after a skipped line: every good one is read (it used to end at the first bad one)
    said = re.search(r"(\d+) training and (\d+) validation conversations?[^;]*; .*2 not JSON", capsys.readouterr().out)
    assert said and int(said[1]) + int(said[2]) >= 12  # 12 good ones (a tiny set may validate on a training one)
    # a folder reads its conversation files (tests/test_chat_data.py has the rules)
    assert main(["sft", "--from", str(base), "--data", str(tmp_path), "--run-dir", str(tmp_path / "r"), *SFT]) == 2
    assert "bad.jsonl, line 2" in capsys.readouterr().err
    assert main(["sft", "--from", str(base), "--data", f"{path}:x", "--run-dir", str(tmp_path / "r"), *SFT]) == 2
    assert f"no such file ({path} is: the weight after ':' is a number, as in {path}:2)" in capsys.readouterr().err


def test_parquet_conversations_and_what_is_dropped_is_reported(base, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [conversation(i)["messages"] for i in range(20)]
    out_of_order = [[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]] * 3
    empty = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]] * 2
    no_messages = [{"msgs": []}]  # the reason's own braces and colon stay in its count's name
    path = tmp_path / "chats.parquet"
    rows = [json.dumps(m) for m in good[:10] + out_of_order + empty + no_messages] + ["{not json"] \
        + [json.dumps(m) for m in good[10:]]
    pq.write_table(pa.table({"messages": rows}), path)
    assert main(["sft", "--from", str(base), "--data", str(path), "--run-dir", str(tmp_path / "r"), *SFT,
                 "--dry-run"]) == 2
    assert "chats.parquet, row 17: not JSON" in capsys.readouterr().err
    assert main(["sft", "--from", str(base), "--data", str(path), "--run-dir", str(tmp_path / "r"), *SFT,
                 "--dry-run", "--gpu", "rtx4070", "--skip-bad"]) == 0
    said = capsys.readouterr().out
    assert "1 not JSON" in said and "3 roles out of order" in said and "2 empty assistant turn" in said
    assert '1 no messages (expected {"messages": [...]} or a list of messages)' in said
    assert "recipe " in said and "RTX 4070" in said  # the planner's pick and its prediction
    train, _ = load([Source(path)], load_weights(base)[1], 33, val_fraction=0.0, skip_bad=True)
    assert len(train) == 20


def test_an_sft_run_resumes_from_its_own_base_even_when_it_is_gone(base, chats, tmp_path, monkeypatch, capsys):
    """A resumed run starts from the base it was started from (not the newest base run under runs/,
    which may have come since), and when that base has been deleted, from its own checkpoint alone."""
    import shutil

    monkeypatch.chdir(tmp_path)
    mine = shutil.copytree(base, tmp_path / "runs" / "base-one")
    out = tmp_path / "sft"
    args = ["sft", "--data", str(chats), "--run-dir", str(out), *SFT]
    assert main([*args, "--steps", "2"]) == 0  # --from: the newest base run, base-one
    assert json.loads((out / "config.json").read_text())["init_from"] == str(mine)  # absolute: any folder finds it
    shutil.copytree(base, tmp_path / "runs" / "base-two")  # a newer base run
    assert main([*args, "--steps", "3"]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["step"] == 3
    shutil.rmtree(mine)
    capsys.readouterr()
    assert main([*args, "--steps", "4"]) == 0, capsys.readouterr().err
    assert "is gone: the run resumes from its own checkpoint and tokenizer" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    assert main(["chat", str(out), "-p", "What is 3 + 3?", "--max-tokens", "4", "--device", "cpu"]) == 0


def test_training_a_finished_run_further_drops_the_scores_of_its_old_weights(base, chats, tmp_path, capsys):
    """eval.json holds the scores of the weights it measured: a finished run resumed with more --steps
    writes new weights, and `onecard report` must not show the old scores beside them."""
    from onecard.eval_results import merge, read

    out = tmp_path / "sft"
    args = ["sft", "--from", str(base), "--data", str(chats), "--run-dir", str(out), *SFT]
    assert main([*args, "--steps", "2"]) == 0
    merge(out, {"bpb": {"metric": "bits per byte", "value": 3.0, "examples": 1}})
    assert main([*args, "--steps", "3"]) == 0, capsys.readouterr().err
    assert read(out)["tasks"] == {}


def test_a_conversation_dropped_for_its_length_is_not_also_counted_as_cut(base, tmp_path):
    path = tmp_path / "long.jsonl"
    long_question = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y " * 200}]
    path.write_text(json.dumps(long_question) + "\n" + json.dumps(long_answer) + "\n")
    train, _ = load([Source(path)], load_weights(base)[1], 33, val_fraction=0.0)
    assert len(train) == 1
    assert dict(train.counts) == {"cut at the context": 1, "no assistant tokens within the context": 1}


def test_drops_count_by_reason_whichever_message_it_is(base, tmp_path):
    path = tmp_path / "drops.jsonl"
    empty_first = [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]
    empty_second = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] + empty_first
    not_text = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user"}]
    path.write_text("".join(json.dumps(c) + "\n" for c in [empty_first, empty_second, not_text, not_text[2:]]
                            + [empty_second[:2]]))
    train, _ = load([Source(path)], load_weights(base)[1], 33, val_fraction=0.0)
    # it counted "message 1 is an empty assistant turn" apart from "message 3 is an empty assistant turn"
    assert dict(train.counts) == {"empty assistant turn": 2, "content that is not text": 2}


def test_a_conversation_without_an_assistant_turn_is_not_said_to_be_cut(base, tmp_path):
    path = tmp_path / "questions.jsonl"
    question = [{"role": "user", "content": "q"}]
    answered = [*question, {"role": "assistant", "content": "a"}]
    path.write_text("".join(json.dumps(c) + "\n" for c in [question, [{"role": "system", "content": "s"}, *question],
                                                            answered]))
    train, _ = load([Source(path)], load_weights(base)[1], 33, val_fraction=0.0)
    assert dict(train.counts) == {"no assistant turn": 2}  # it said "no assistant tokens within the context"


def test_sharegpt_rows_are_read_as_their_messages(base, tmp_path):
    """{"conversations": [{"from": "human", "value": ...}]}, as many public chat sets come, in JSON lines and
    in parquet: it was refused as "no messages" (and the parquet file for its columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = load_weights(base)[1]
    chat = [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    tool = [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]
    lines = tmp_path / "sharegpt.jsonl"
    lines.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in [chat, chat[1:], tool]))
    train, _ = load([Source(lines)], tokenizer, 64, val_fraction=0.0)
    assert len(train) == 2 and dict(train.counts) == {"a ShareGPT message from 'function_call'": 1}
    expected = render(tokenizer, [{"role": "user", "content": "Be terse.\n\n2+2?"},
                                  {"role": "assistant", "content": "4"}])
    assert train.items[0][0].tolist() == expected.ids
    table = tmp_path / "sharegpt.parquet"
    pq.write_table(pa.table({"conversations": [chat[1:]], "id": ["a"]}), table)
    assert len(load([Source(table)], tokenizer, 64, val_fraction=0.0)[0]) == 1


def test_each_reason_for_a_drop_names_where_it_first_happened(base, tmp_path, capsys):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in [good] * 3 + [good[::-1]] * 30 + [good[:1]]) + "{not\n")
    args = ["sft", "--from", str(base), "--data", str(path), "--run-dir", str(tmp_path / "r"), *SFT, "--dry-run"]
    assert main([*args, "--skip-bad"]) == 0
    said = capsys.readouterr().out  # it said "30 roles out of order" and left the user to search 35 lines
    assert f"30 roles out of order (first: {path}, line 4)" in said and f"1 no assistant turn (first: {path}, " \
        f"line 34)" in said and f"1 not JSON (first: {path}, line 35)" in said
    path.write_text("".join(json.dumps({"dialog": good}) + "\n" for _ in range(3)))  # a key onecard does not read
    assert main(args) == 2
    assert f"(3 no messages (expected {{\"messages\": [...]}} or a list of messages) (first: {path}, line 1))" \
        in capsys.readouterr().err
