"""Conversations render exactly as nanochat's render_conversation (ids and mask), and bad ones are
refused with a reason."""

import pytest

from onecard.conversations import BadConversation, normalize, prompt_ids, render, reply_content
from onecard.data import Corpus, iter_texts
from onecard.tokenizer import Tokenizer
from tests.reference import nanochat

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "three"}, {"role": "assistant", "content": "four, five"}]},
    {"messages": [{"role": "user", "content": "What is 37*12?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me compute. "},
                      {"type": "python", "text": "37*12"},
                      {"type": "python_output", "text": "444"},
                      {"type": "text", "text": " The answer is 444."}]}]},
    {"messages": [{"role": "user", "content": "Ünïcödé — 日本語 🙂?"},
                  {"role": "assistant", "content": "Ja: 🙂 ça va."}]},
    {"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok " * 300}]},
    [{"role": "user", "content": "a bare list, as nanochat's CustomJSON"}, {"role": "assistant", "content": "yes"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(iter_texts(Corpus.embedded(), 200_000), 512)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("max_tokens", [2048, 40])
def test_ids_and_mask_equal_nanochats(tok, index, max_tokens):
    reference = nanochat("fae3aca", "tokenizer").RustBPETokenizer(tok.enc, "<|bos|>")
    raw = CONVERSATIONS[index]
    theirs = reference.render_conversation(raw if isinstance(raw, dict) else {"messages": raw}, max_tokens)
    ours = render(tok, normalize(raw), max_tokens)
    assert (ours.ids, ours.mask) == (list(theirs[0]), list(theirs[1]))
    assert ours.truncated == (len(render(tok, normalize(raw)).ids) > max_tokens)


def test_mask_by_hand(tok):
    """1 on the assistant's text, python blocks and <|assistant_end|>; 0 elsewhere (output included)."""
    rendered = render(tok, normalize(CONVERSATIONS[3]))
    name = {tok.special_id(s): s for s in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                           "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                           "<|output_start|>", "<|output_end|>")}
    masked = {name[i]: m for i, m in zip(rendered.ids, rendered.mask, strict=True) if i in name}
    assert masked == {"<|bos|>": 0, "<|user_start|>": 0, "<|user_end|>": 0, "<|assistant_start|>": 0,
                      "<|python_start|>": 1, "<|python_end|>": 1, "<|output_start|>": 0, "<|output_end|>": 0,
                      "<|assistant_end|>": 1}
    learned = tok.decode([i for i, m in zip(rendered.ids, rendered.mask, strict=True) if m and i not in name])
    assert learned == "Let me compute. 37*12 The answer is 444."


def test_prompt_for_a_reply(tok):
    messages = normalize([{"role": "user", "content": "Hi"}], training=False)
    ids = prompt_ids(tok, messages)
    assert ids[0] == tok.bos_id and ids[-1] == tok.special_id("<|assistant_start|>")


@pytest.mark.parametrize("raw, reason", [
    ({}, "no messages"),
    ({"messages": []}, "no messages"),
    ([{"role": "assistant", "content": "x"}], "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], "neither text nor"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "html", "text": "x"}]}], "part"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "system message"),
    ([{"role": "user", "content": 3}], "not text"),
    (["hello"], "not an object"),
    ("text", "no messages"),
])
def test_bad_conversations_say_why(raw, reason):
    with pytest.raises(BadConversation, match=reason):
        normalize(raw)


@pytest.mark.parametrize("content", ["  ", [{"type": "text", "text": " "}]])
def test_a_blank_reply_is_refused_for_training_and_kept_in_a_chat(content):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": content},
                {"role": "user", "content": "b"}]
    with pytest.raises(BadConversation, match="empty assistant turn"):
        normalize(messages)
    assert normalize(messages, training=False)[1]["content"] == content


@pytest.mark.parametrize("cut", [None, "<|output_end|>", "<|python_end|>"])
def test_a_reply_goes_back_into_the_history_as_the_tokens_the_model_wrote(tok, cut):
    special = tok.special_id
    wrote = (tok.encode("Let me compute. ") + [special("<|python_start|>")] + tok.encode("37*12")
             + [special("<|python_end|>"), special("<|output_start|>")] + tok.encode("444")
             + [special("<|output_end|>")] + tok.encode(" So 444.\nDone"))
    if cut:  # stopped by Ctrl-C inside the calculator's output, or inside the call itself
        wrote = wrote[:wrote.index(special(cut))]
    history = [{"role": "user", "content": "What is 37*12?"},
               {"role": "assistant", "content": reply_content(tok.decode(wrote))},
               {"role": "user", "content": "thanks"}]
    ids = prompt_ids(tok, normalize(history, training=False))
    start = ids.index(special("<|assistant_start|>")) + 1
    closed = wrote + ([special(cut)] if cut else []) + [special("<|assistant_end|>")]  # rendering closes the part
    assert ids[start:start + len(closed)] == closed


def test_a_json_file_is_one_document_or_json_lines(tmp_path):
    import json

    from onecard.conversations import read_file
    first = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    second = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    cases = {"list.json": json.dumps([first, second], indent=2),  # a list of conversations
             "one.json": json.dumps(second, indent=2),  # one conversation, a bare list of messages
             "lines.json": json.dumps(first) + "\n" + json.dumps(second) + "\n"}  # JSON lines
    read = {}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        read[name] = [conversation for _, _, conversation in read_file(tmp_path / name)]
    assert read == {"list.json": [first, second], "one.json": [second], "lines.json": [first, second]}


def test_a_broken_json_document_is_named_by_where_the_document_breaks(tmp_path):
    import json

    from onecard.conversations import read_file
    from onecard.errors import UsageError
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    text = json.dumps([good] * 3, indent=2).replace("]\n  },", "]\n  }", 1)  # a comma left out on line 13
    (tmp_path / "chats.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as error:
        json.loads(text)
    assert error.value.lineno == 14
    # it read the file as JSON lines and said "chats.json, line 1: not JSON (Expecting value: line 2 column 1 ...)"
    with pytest.raises(UsageError) as said:
        list(read_file(tmp_path / "chats.json"))
    assert str(said.value) == f"{tmp_path / 'chats.json'}: not JSON ({error.value})"


def test_a_file_name_in_capitals_reads_as_its_kind(tmp_path, tok):
    import json

    from onecard.conversations import read_file
    from onecard.sft_data import Source, load
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    (tmp_path / "CHATS.JSONL").write_text(json.dumps(chat) + "\n")
    (tmp_path / "MORE.JSON").write_text(json.dumps([chat, chat], indent=2))
    # it said "CHATS.JSONL: conversations come as .jsonl, .json or .parquet files"
    assert [c for _, _, c in read_file(tmp_path / "CHATS.JSONL")] == [chat]
    assert [c for _, _, c in read_file(tmp_path / "MORE.JSON")] == [chat, chat]
    assert len(load([Source(tmp_path)], tok, 512, val_fraction=0.0)[0]) == 3  # a folder reads them too


def test_openai_text_parts_in_a_user_or_system_message_are_its_text():
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
                {"role": "user", "content": parts, "name": "ann"}, {"role": "assistant", "content": "4"}]
    # it refused them: "system and user messages hold text", "content that is not text: message 0 (user)"
    assert [m["content"] for m in normalize(messages)] == ["Be terse.\n\nWhat is 2+2?", "4"]
    assert normalize(messages[1:])[0]["content"] == "What is 2+2?"
    with pytest.raises(BadConversation, match="content that is not text"):
        normalize([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, messages[2]])
