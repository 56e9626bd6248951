import json
import os
import pickle
import re

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from onecard.data import Corpus, iter_texts
from onecard.errors import UsageError
from onecard.tokenizer import SPECIAL_TOKENS, Tokenizer, check_save_folder, load_tiktoken_pickle

VOCAB = 512
N_MERGEABLE = VOCAB - len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(iter_texts(Corpus.embedded(), 300_000), VOCAB)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_on_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_token_bytes_add_up_to_utf8_length(tok, text):
    counts = tok.token_bytes()
    ids = tok.encode(text, prepend_bos=True)
    assert int(counts[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_by_hand(tok):
    counts = tok.token_bytes()
    assert counts.shape == (VOCAB,)
    assert counts[N_MERGEABLE:].tolist() == [0] * len(SPECIAL_TOKENS)
    for i in (0, 65, 255, 300, N_MERGEABLE - 1):
        assert counts[i] == len(tok.enc.decode_single_token_bytes(i))
    assert int(counts[tok.encode("héllo, 世界")].sum()) == 6 + 1 + 1 + 6  # é is 2 bytes, each CJK char 3


def test_specials_come_after_the_merges(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(N_MERGEABLE, VOCAB))
    assert tok.bos_id == N_MERGEABLE
    assert max(tok.encode("def f(x):\n    return x ** 2  # done\n")) < N_MERGEABLE
    with pytest.raises(UsageError):
        tok.special_id("<|nope|>")


def test_special_text_is_not_a_special_token(tok):
    text = "<|bos|> and <|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(N_MERGEABLE, VOCAB))
    assert tok.decode(ids) == text
    assert tok.encode(text, prepend_bos=True) == [tok.bos_id, *ids]


def test_encode_batch_matches_encode(tok):
    texts = ["", "import os\n", "numbers 12345 and ünïcode", "x" * 1000]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, prepend_bos=True) == [[tok.bos_id, *tok.encode(t)] for t in texts]


def test_numbers_split_into_groups_of_at_most_two_digits(tok):
    # the stdlib is full of 3- and 4-digit numbers (255, 1000, 2024...): with GPT-4's \p{N}{1,3}
    # some token would hold three digits
    digit_tokens = [tok.enc.decode_single_token_bytes(i) for i in range(N_MERGEABLE)]
    digit_tokens = [b for b in digit_tokens if re.fullmatch(rb"[0-9]+", b)]
    assert any(len(b) == 2 for b in digit_tokens)
    assert all(len(b) <= 2 for b in digit_tokens)
    # a text of nothing but numbers, "2024" most of all: merges would happily make 3-digit tokens
    numbers = Tokenizer.train([" ".join(str(n) for n in range(1000, 3000)) + " 2024" * 500], 300)
    pieces = [numbers.decode([i]) for i in numbers.encode("x = 1234567 99999999")]
    assert "".join(p for p in pieces if p.strip().isdigit()).replace(" ", "") == "123456799999999"
    assert all(len(p.strip()) <= 2 for p in pieces if p.strip().isdigit())
    assert max(len(numbers.enc.decode_single_token_bytes(i)) for i in range(300 - len(SPECIAL_TOKENS))) == 2
    pieces = [tok.decode([i]) for i in tok.encode("x = 1234567")]
    assert "".join(p for p in pieces if p.isdigit()) == "1234567"
    assert all(len(p) <= 2 for p in pieces if p.isdigit())


def test_vocab_beyond_what_the_text_supports_is_a_usage_error():
    with pytest.raises(UsageError, match="lower --vocab-size"):
        Tokenizer.train(["the cat sat on the mat"] * 3, 5000)


def test_vocab_too_small_is_a_usage_error():
    with pytest.raises(UsageError):
        Tokenizer.train(["abc"], 256 + len(SPECIAL_TOKENS))


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())  # plain data, no code
    assert data["special_tokens"]["<|bos|>"] == N_MERGEABLE
    assert len(data["mergeable_ranks"]) == N_MERGEABLE
    sample = "class A:\n    pass  # 2024-01-01 ünïcode <|bos|>\n"
    from_json = Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    from_pkl = Tokenizer.load(tmp_path)
    for other in (from_json, from_pkl):
        assert other.vocab_size == VOCAB
        assert other.encode(sample) == tok.encode(sample)
        assert [other.special_id(n) for n in SPECIAL_TOKENS] == [tok.special_id(n) for n in SPECIAL_TOKENS]
        assert other.token_bytes().tolist() == tok.token_bytes().tolist()
    with pytest.raises(UsageError):
        Tokenizer.load(tmp_path / "nowhere")


def test_a_damaged_json_is_read_from_the_pickle_saved_beside_it(tok, tmp_path, capsys):
    """A cut-short tokenizer.json refused the run's resume, though tokenizer.pkl beside it was whole."""
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes()[:100])
    back = Tokenizer.load(tmp_path)
    assert back.encode("def f(x): return x") == tok.encode("def f(x): return x")
    assert "is not an onecard tokenizer file" in capsys.readouterr().err
    (tmp_path / "tokenizer.pkl").unlink()  # nothing to fall back on: refused as before
    with pytest.raises(UsageError, match="is not an onecard tokenizer file"):
        Tokenizer.load(tmp_path)

def test_loads_a_pickle_written_the_way_nanochat_writes_it(tmp_path):
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256}
    specials = {name: 257 + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=r"\w+|\s+|[^\w\s]+", mergeable_ranks=ranks,
                            special_tokens=specials)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    loaded = load_tiktoken_pickle(tmp_path / "tokenizer.pkl")
    assert isinstance(loaded, tiktoken.Encoding)
    assert loaded.encode_ordinary("abab c") == [256, 256, 32, 99]
    assert Tokenizer.load(tmp_path).bos_id == 257


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UsageError, match=r"refuses to load .*system"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UsageError, match="refuses to load"):
        load_tiktoken_pickle(tmp_path / "tokenizer.pkl")
    assert not marker.exists()
    # control: the same pickle does run when unpickled the ordinary way, so the test can fail
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


def test_malicious_payload_inside_an_encoding_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = {"name": "x", "pat_str": "x", "special_tokens": {}, "mergeable_ranks": _Evil(marker)}
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_encoding_pickle(state))
    with pytest.raises(UsageError, match="refuses to load"):
        load_tiktoken_pickle(path)
    assert not marker.exists()


def _encoding_pickle(state) -> bytes:
    """A pickle that rebuilds a tiktoken.core.Encoding from `state`, written opcode by opcode."""
    body = pickle.dumps(state, protocol=3)[2:-1]  # without its PROTO header and STOP
    return b"\x80\x03" + b"ctiktoken.core\nEncoding\n" + b")\x81" + body + b"b."


def test_non_encoding_pickles_are_refused(tmp_path):
    path = tmp_path / "tokenizer.pkl"
    bad = [
        pickle.dumps({"name": "cl100k_base"}),  # not an Encoding at all
        b"not a pickle at all",
        _encoding_pickle("cl100k_base"),  # an Encoding by registered name: would need a download
        _encoding_pickle({"name": "x", "pat_str": "x", "special_tokens": {}, "mergeable_ranks": [1]}),
    ]
    for data in bad:
        path.write_bytes(data)
        with pytest.raises(UsageError, match="not a pickled tiktoken Encoding"):
            load_tiktoken_pickle(path)
    # control: a well-formed state through the same route loads
    ranks = {bytes([i]): i for i in range(256)}
    path.write_bytes(_encoding_pickle({"name": "x", "pat_str": r"\S+|\s+", "special_tokens": {},
                                       "mergeable_ranks": ranks}))
    assert load_tiktoken_pickle(path).encode_ordinary("ab") == [97, 98]


# ---- faults: a one-line UsageError, never a traceback


def _untouched_texts():
    raise AssertionError("read training text before checking the vocabulary size")
    yield ""


@pytest.mark.parametrize("vocab_size", [1e30, 10**30, 2**31, 2**31 + 1, 2**63, 256 + len(SPECIAL_TOKENS), -1, 0,
                                        True, "65536", 300.0, None])
def test_absurd_vocab_sizes_are_refused_before_any_work(vocab_size):
    with pytest.raises(UsageError, match="vocab size") as caught:
        Tokenizer.train(_untouched_texts(), vocab_size)
    assert "\n" not in str(caught.value)


def test_save_onto_a_file_is_a_usage_error(tok, tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(UsageError, match=re.escape(str(tmp_path / "file"))) as caught:
            tok.save(target)
        assert "\n" not in str(caught.value)
        with pytest.raises(UsageError, match="is a file"):
            check_save_folder(target)  # what a command can ask before it trains
    assert (tmp_path / "file").read_text() == "x"


def _valid_json(tok, tmp_path) -> dict:
    tok.save(tmp_path / "good")
    return json.loads((tmp_path / "good" / "tokenizer.json").read_text())


def _broken_jsons(good: dict) -> list:
    ranks, specials = good["mergeable_ranks"], good["special_tokens"]
    return [
        b"not json", b"", b"\xff\xfe\x00garbage", b"[]", b"3", b"null", b'"x"', b"{}", b"[" * 100_000,
        {**good, "format": "other"},
        {**good, "mergeable_ranks": None},
        {**good, "mergeable_ranks": [[1, 2, 3]]},
        {**good, "mergeable_ranks": [["!!notbase64", 0]]},
        {**good, "mergeable_ranks": ranks[:100] + ranks[101:]},  # a byte and a rank missing
        {**good, "mergeable_ranks": [[t, r + 5] for t, r in ranks]},  # ranks do not start at 0
        {**good, "mergeable_ranks": ranks + [ranks[-1]]},  # a token twice
        {**good, "mergeable_ranks": [[t, -r] for t, r in ranks]},
        {**good, "mergeable_ranks": [[t, 2**70] for t, _ in ranks[:1]] + ranks[1:]},
        {**good, "special_tokens": {}},
        {**good, "special_tokens": {**specials, "<|bos|>": 3}},  # clashes with a byte's rank
        {**good, "special_tokens": {**specials, "<|bos|>": 10**9}},
        {**good, "special_tokens": [1, 2]},
        {**good, "pattern": "(unclosed"},
        {**good, "pattern": None},
        {**good, "name": {"a": 1}},
    ]


def test_malformed_tokenizer_json_is_a_usage_error(tok, tmp_path):
    broken = _broken_jsons(_valid_json(tok, tmp_path))
    (tmp_path / "bad").mkdir()
    for i, content in enumerate(broken):
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        (tmp_path / "bad" / "tokenizer.json").write_bytes(raw)
        with pytest.raises(UsageError) as caught:
            Tokenizer.load(tmp_path / "bad")
        assert "\n" not in str(caught.value), i


def test_load_of_missing_or_odd_paths_is_a_usage_error(tok, tmp_path):
    for path in (tmp_path / "nowhere", tmp_path / "nowhere" / "deeper"):
        with pytest.raises(UsageError, match="no tokenizer"):
            Tokenizer.load(path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError):
        Tokenizer.load(tmp_path / "afile" / "sub")
    (tmp_path / "dir" / "tokenizer.json").mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(UsageError):
        Tokenizer.load(tmp_path / "dir")
    tok.save(tmp_path / "good")  # the file itself, given instead of its folder
    assert Tokenizer.load(tmp_path / "good" / "tokenizer.json").vocab_size == VOCAB


def test_training_text_with_a_lone_surrogate_trains(tmp_path):
    """JSON's "\\ud83d" (half an emoji) loads as a lone surrogate, which rustbpe's training cannot
    take: it stopped `onecard train` with a traceback. It trains as U+FFFD, as tiktoken encodes it."""
    texts = [json.loads('"half an emoji \\ud83d here"'), "plain text, and more of it: " * 50]
    tokenizer = Tokenizer.train(texts, 280)
    assert tokenizer.decode(tokenizer.encode(texts[0])) == "half an emoji \ufffd here"


@pytest.mark.parametrize("pattern", ["", "a*", r"\b", "$", r"\S+|"])
def test_a_split_pattern_that_matches_empty_text_is_refused(tok, tmp_path, pattern):
    """tiktoken panics (a Rust panic, a traceback) on text where its split pattern matches nothing at all: a
    tokenizer.json or tokenizer.pkl whose pattern did loaded, and `onecard chat` failed at the first message."""
    data = {**_valid_json(tok, tmp_path), "pattern": pattern}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="split pattern"):
        Tokenizer.load(tmp_path / "bad")
    ranks = {bytes([i]): i for i in range(256)}
    (tmp_path / "tokenizer.pkl").write_bytes(_encoding_pickle({"name": "x", "pat_str": pattern,
                                                               "special_tokens": {}, "mergeable_ranks": ranks}))
    with pytest.raises(UsageError, match="split pattern"):
        load_tiktoken_pickle(tmp_path / "tokenizer.pkl")
