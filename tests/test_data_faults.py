"""Corpora that are damaged or odd: a one-line UsageError naming the file, never a traceback; and a
corpus of one .txt file, which is cut into pieces so that validation gets some of its text."""

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import make_docs

import onecard.data as data
import onecard.textblocks as textblocks
from onecard.data import Corpus, DocPosition, iter_texts
from onecard.errors import UsageError
from onecard.loader import TokenLoader
from onecard.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(400, 99), 300)


def usage_error(make, *fragments: str) -> str:
    """The one-line message of the UsageError that `make` (and reading everything it gives) raises."""
    with pytest.raises(UsageError) as caught:
        list(make().documents())
    message = str(caught.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- files that are not what their suffix says


NOT_PARQUET = [b"just some text, not parquet\n" * 20, b"", b"PAR1", b"PAR1" + b"\0" * 64 + b"PAR1"]


@pytest.mark.parametrize("content", NOT_PARQUET, ids=["text", "empty", "magic", "zeros"])
def test_a_parquet_file_that_is_not_parquet(tmp_path, content):
    path = tmp_path / "fake.parquet"
    path.write_bytes(content)
    usage_error(lambda: Corpus(path), str(path), "not a readable parquet file")
    (tmp_path / "good.txt").write_text("fine")  # in a folder, the bad file is named too
    usage_error(lambda: Corpus(tmp_path), str(path), "not a readable parquet file")


def test_a_truncated_parquet_file(tmp_path):
    pq.write_table(pa.table({"text": make_docs(200, 5)}), tmp_path / "whole.parquet", row_group_size=50)
    raw = (tmp_path / "whole.parquet").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 3):
        (tmp_path / "whole.parquet").write_bytes(raw[:cut])
        usage_error(lambda: Corpus(tmp_path / "whole.parquet"), "whole.parquet", "not a readable parquet file")


def test_a_parquet_file_whose_pages_are_damaged(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": make_docs(300, 6)}), path, row_group_size=100, compression="snappy")
    raw = bytearray(path.read_bytes())
    raw[200:2000] = os.urandom(1800)  # the first row group's data, not the footer
    path.write_bytes(bytes(raw))
    usage_error(lambda: Corpus(path, val_fraction=0), str(path))


def test_a_parquet_text_column_that_is_not_strings(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    usage_error(lambda: Corpus(tmp_path), "n.parquet", "'text'")


def test_a_parquet_file_without_a_text_column_is_named(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "s.parquet")
    usage_error(lambda: Corpus(tmp_path), "s.parquet", "'text' column")


@pytest.mark.parametrize("bad, line", [('{"text": "fine"}\n{"text": 3}\n', 2), ('\n\n{"text": "a"}\n{oops\n', 4),
                                       ('[1, 2]\n', 1), (b'{"text": "ok"}\n\xff\xfe{"text": "x"}\n', 2)])
def test_a_malformed_jsonl_line_is_named_by_its_number(tmp_path, monkeypatch, bad, line):
    path = tmp_path / "d.jsonl"
    path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    usage_error(lambda: Corpus(path, val_fraction=0), str(path), f"line {line}")
    monkeypatch.setattr(textblocks, "BLOCK_BYTES", 7)  # the line number counts lines in earlier blocks too
    usage_error(lambda: Corpus(path, val_fraction=0), str(path), f"line {line}")


# ---- paths


def test_paths_that_hold_no_corpus(tmp_path):
    usage_error(lambda: Corpus(tmp_path / "missing.txt"), "does not exist")
    usage_error(lambda: Corpus(tmp_path), "holds no documents")
    (tmp_path / "a.md").write_text("x")
    usage_error(lambda: Corpus(tmp_path), "holds no documents")
    usage_error(lambda: Corpus("/proc/self"))
    usage_error(lambda: Corpus("/proc/self/status"))
    (tmp_path / "file").write_text("x")
    usage_error(lambda: Corpus(tmp_path / "file" / "under.txt"), "does not exist")


def test_a_file_that_cannot_be_read(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(make_docs(50, 1)))
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n')
    corpus = Corpus(tmp_path)
    (tmp_path / "a.txt").unlink()  # gone after the corpus was listed
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(UsageError, match="cannot read .*a.txt"):
        list(corpus.documents())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.txt").write_text("other text")
    (tmp_path / "a.txt").chmod(0)
    usage_error(lambda: Corpus(tmp_path), "a.txt")


def test_a_proc_file_behind_a_txt_name_is_not_read(tmp_path):
    (tmp_path / "book.txt").write_text(" ".join(make_docs(20, 2)))
    (tmp_path / "mem.txt").symlink_to("/proc/self/mem")  # reading it fails; its size says it is empty
    texts = [text for _, text in Corpus(tmp_path, val_fraction=0).documents()]
    assert "".join(texts) == (tmp_path / "book.txt").read_text()


# ---- one .txt file: cut into pieces, some held out for validation


def book(n_chars: int, seed: int = 0) -> str:
    text = "\n".join(make_docs(n_chars // 20 + 1, seed))
    return text[:n_chars]


def pieces(corpus: Corpus, split: str) -> list[tuple[DocPosition, str]]:
    return list(corpus.documents(split))


def assert_cut(corpus: Corpus, text: str, docs: list[tuple[DocPosition, str]]) -> None:
    """The pieces make up the text, and every one with more than whitespace is a document once."""
    cut = [(DocPosition(0, c, d), piece) for c in range(corpus.num_chunks(0))
           for d, piece in enumerate(corpus.read_chunk(0, c))]
    assert "".join(piece for _, piece in cut) == text
    assert sorted(docs) == [(pos, piece) for pos, piece in cut if piece.strip()]


@pytest.mark.parametrize("n_chars", [200, 5_000, 60_000])
def test_one_txt_file_is_split_by_its_text(tmp_path, tok, n_chars):
    text = book(n_chars)
    (tmp_path / "book.txt").write_text(text)
    corpus = Corpus(tmp_path / "book.txt")
    train, val = pieces(corpus, "train"), pieces(corpus, "val")
    assert train and val
    assert_cut(corpus, text, train + val)
    val_chars = sum(len(t) for _, t in val)
    assert val_chars <= 0.5 * n_chars if n_chars < 1000 else val_chars < 0.1 * n_chars
    assert all(len(t) <= data.PIECE_CHARS for _, t in train + val)
    again = Corpus(tmp_path / "book.txt")
    assert pieces(again, "val") == val  # deterministic
    assert TokenLoader(corpus, tok, 1, 8, split="val").next_batch()[0].shape == (1, 8)
    assert TokenLoader(corpus, tok, 1, 8).next_batch()[0].shape == (1, 8)
    assert "".join(iter_texts(corpus, 10**9, doc_chars=10**9)) == "".join(t for _, t in train)


def test_a_long_txt_file_is_read_in_blocks_and_about_the_fraction_is_held_out(tmp_path, monkeypatch):
    monkeypatch.setattr(textblocks, "BLOCK_BYTES", 50_000)
    monkeypatch.setattr(data, "PIECE_CHARS", 1000)
    text = book(400_000, seed=3)
    (tmp_path / "book.txt").write_text(text)
    corpus = Corpus(tmp_path / "book.txt", val_fraction=0.05)
    n_chunks = -(-(tmp_path / "book.txt").stat().st_size // 50_000)
    assert corpus.num_chunks(0) == n_chunks >= 8
    train, val = pieces(corpus, "train"), pieces(corpus, "val")
    assert_cut(corpus, text, train + val)
    assert 0.03 < sum(len(t) for _, t in val) / len(text) < 0.07
    assert {pos.chunk for pos, _ in val} >= set(range(n_chunks - 1))
    start = train[len(train) // 2][0]
    assert list(corpus.documents("train", start=start)) == train[len(train) // 2:]


def test_a_cut_text_resumes_exactly(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(textblocks, "BLOCK_BYTES", 20_000)
    (tmp_path / "book.txt").write_text(book(100_000, seed=4))
    corpus = Corpus(tmp_path / "book.txt")
    reference = TokenLoader(corpus, tok, 2, 64, seed=1)
    batches = [reference.next_batch()[0] for _ in range(40)]
    loader = TokenLoader(corpus, tok, 2, 64, seed=1)
    for _ in range(17):
        loader.next_batch()
    resumed = TokenLoader(corpus, tok, 2, 64, seed=1)
    resumed.load_state_dict(loader.state_dict())
    assert all((resumed.next_batch()[0] == batch).all() for batch in batches[17:])


def test_one_line_of_text_is_cut_into_blocks(tmp_path, tok):
    (tmp_path / "line.txt").write_text("x" * 199 + "y")
    corpus = Corpus(tmp_path / "line.txt")
    assert [t for _, t in pieces(corpus, "train") + pieces(corpus, "val")] in (["x" * 100, "x" * 99 + "y"],
                                                                              ["x" * 99 + "y", "x" * 100])
    TokenLoader(corpus, tok, 1, 4, split="val").next_batch()


@pytest.mark.parametrize("text", ["a", "   \n\n  b  \n\n"])
def test_a_text_too_small_to_split_says_so(tmp_path, tok, text):
    (tmp_path / "tiny.txt").write_text(text)
    corpus = Corpus(tmp_path / "tiny.txt")
    with pytest.raises(UsageError, match="too little text .* validation"):
        TokenLoader(corpus, tok, 1, 4, split="val").next_batch()
    assert [t for _, t in Corpus(tmp_path / "tiny.txt", val_fraction=0).documents()] == [text]


def test_without_validation_a_txt_file_stays_one_document(tmp_path):
    text = book(30_000)
    (tmp_path / "book.txt").write_text(text)
    corpus = Corpus(tmp_path / "book.txt", val_fraction=0)
    assert list(corpus.documents()) == [(DocPosition(0, 0, 0), text)]


def old_fingerprint(corpus: Corpus) -> str:
    digest = hashlib.blake2b(digest_size=4)
    for name, size in zip(corpus.names, corpus.sizes, strict=True):
        digest.update(f"{name}\0{size}\0".encode())
    return digest.hexdigest()


def test_the_split_and_fingerprint_of_several_files_do_not_change(tmp_path):
    for i, text in enumerate(make_docs(12, 4)):
        (tmp_path / f"{i:02d}.txt").write_text(text)
    corpus = Corpus(tmp_path, val_fraction=0.2)
    ranked = sorted(range(12), key=lambda i: data._unit_hash(corpus.names[i], 0, 0))
    assert {pos.file for pos, _ in corpus.documents("val")} == set(ranked[:round(0.2 * 12)])
    assert f"fingerprint {old_fingerprint(corpus)}, validation fraction 0.2" in corpus.describe()
    embedded = Corpus.embedded()
    assert f"fingerprint {old_fingerprint(embedded)}, validation fraction 0.02" in embedded.describe()


def test_a_cut_text_has_its_own_fingerprint(tmp_path):
    (tmp_path / "book.txt").write_text(book(3000))
    cut, whole = Corpus(tmp_path / "book.txt"), Corpus(tmp_path / "book.txt", val_fraction=0)
    assert f"fingerprint {old_fingerprint(whole)}," in whole.describe()
    assert f"fingerprint {old_fingerprint(cut)}," not in cut.describe()  # a resume sees other documents
    assert "pieces" in cut.describe()


def test_a_download_that_fetched_nothing_says_so(tmp_path):
    from onecard.datasources import write_manifest

    write_manifest(tmp_path, {"set": "fineweb-edu", "validation": ["shard_01822.parquet"], "files": {}})
    with pytest.raises(UsageError, match="holds no documents: its download did not finish a shard: rerun"):
        Corpus(tmp_path)
    (tmp_path / "onecard-dataset.json").unlink()
    with pytest.raises(UsageError, match="holds no documents: onecard reads"):
        Corpus(tmp_path)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """A name from an old Latin-1 archive ('caf\\xe9.txt') used to crash the split's hash."""
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 10)
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "w") as f:
        f.write("du texte\n" * 10)
    corpus = Corpus(tmp_path)
    assert len(corpus.names) == 4 and "4 files" in corpus.describe()
    assert sum(1 for _ in iter_texts(corpus, 10**6)) >= 3


def test_the_folder_above_a_download_is_refused(tmp_path):
    """Given from above, a download's validation shard was split like any file and mostly trained on."""
    from onecard.datasources import write_manifest

    folder = tmp_path / "fineweb-edu"
    folder.mkdir()
    (folder / "shard_00000.txt").write_text("text\n" * 10)
    write_manifest(folder, {"set": "fineweb-edu", "validation": ["shard_00000.txt"], "files": {}})
    with pytest.raises(UsageError, match=f"holds a downloaded dataset in {folder}: give that folder as --data"):
        Corpus(tmp_path)
