import json
import random
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import onecard.data as data
import onecard.textblocks as textblocks
from onecard.data import Corpus, DocPosition, iter_texts
from onecard.errors import UsageError
from onecard.loader import TokenLoader
from onecard.tokenizer import Tokenizer

WORDS = "the a cat dog sat ran on under mat tree big small red 42 1999 naïve café 世界 , . ! ?".split()


def make_docs(n: int, seed: int, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for i in range(n)]


def write_jsonl(path, texts, blank_every=0):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            if blank_every and i % blank_every == 0:
                f.write("\n")  # blank lines are allowed and skipped
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def write_parquet(path, texts, row_group_size):
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(400, 99), 300)


@pytest.fixture
def mixed(tmp_path) -> tuple[Corpus, list[str]]:
    """A folder with every kind of file: 8 .txt, 2 .jsonl, 1 .parquet with 6 row groups."""
    docs = []
    for i, text in enumerate(make_docs(8, 1, "txt")):
        (tmp_path / "books").mkdir(exist_ok=True)
        (tmp_path / "books" / f"{i}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    for j in range(2):
        texts = make_docs(30, 10 + j, f"jsonl{j}")
        write_jsonl(tmp_path / f"part{j}.jsonl", texts, blank_every=7)
        docs += texts
    texts = make_docs(30, 20, "parquet")
    write_parquet(tmp_path / "shard_00000.parquet", texts, row_group_size=5)
    docs += texts
    return Corpus(tmp_path, val_fraction=0.15), docs


def stream(loader: TokenLoader, n_batches: int) -> list[int]:
    """The token stream behind n batches: each row is its inputs plus the last target."""
    out = []
    for _ in range(n_batches):
        inputs, targets = loader.next_batch()
        for row_in, row_tg in zip(inputs.tolist(), targets.tolist(), strict=True):
            out += row_in + row_tg[-1:]
    return out


def split_at_bos(tokens: list[int], bos: int) -> list[list[int]]:
    assert tokens[0] == bos
    docs = []
    for t in tokens:
        if t == bos:
            docs.append([])
        else:
            docs[-1].append(t)
    return docs


# ---- corpora


def test_txt_folder_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("bee text")
    (tmp_path / "sub" / "a.txt").write_text("ay text ünï")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.md").write_text("not read")
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    corpus = Corpus(tmp_path, val_fraction=0)
    assert corpus.names == ["b.txt", "empty.txt", "sub/a.txt"]
    assert list(corpus.documents()) == [(DocPosition(0, 0, 0), "bee text"),
                                        (DocPosition(2, 0, 0), "ay text ünï")]
    assert "3 files" in corpus.describe()


def test_jsonl_lines_are_documents(tmp_path):
    texts = make_docs(50, 2) + ["line with\nnewline and \"quotes\" 世界"]
    write_jsonl(tmp_path / "d.jsonl", texts, blank_every=5)
    corpus = Corpus(tmp_path / "d.jsonl", val_fraction=0)
    assert [text for _, text in corpus.documents()] == texts


def test_jsonl_byte_blocks_cover_every_line_once_and_resume_without_rereading(tmp_path, monkeypatch):
    monkeypatch.setattr(textblocks, "BLOCK_BYTES", 37)  # far smaller than a line: most blocks are empty
    texts = make_docs(60, 3)
    write_jsonl(tmp_path / "d.jsonl", texts, blank_every=4)
    corpus = Corpus(tmp_path / "d.jsonl", val_fraction=0)
    size = (tmp_path / "d.jsonl").stat().st_size
    assert corpus.num_chunks(0) == -(-size // 37)
    docs = list(corpus.documents())
    assert [text for _, text in docs] == texts
    start = docs[40][0]
    read = []
    original = corpus.read_chunk
    monkeypatch.setattr(corpus, "read_chunk", lambda f, c: read.append(c) or original(f, c))
    assert [text for _, text in corpus.documents(start=start)] == texts[40:]
    assert min(read) == start.chunk


def test_bad_jsonl_line_is_a_usage_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(UsageError, match="'text'"):
        list(Corpus(tmp_path, val_fraction=0).documents())


def test_parquet_is_read_by_row_group(tmp_path, monkeypatch):
    texts = make_docs(35, 4)
    texts[7] = None  # missing values are empty documents, skipped
    write_parquet(tmp_path / "s.parquet", texts, row_group_size=10)

    def whole_file(*args, **kwargs):
        raise AssertionError("read a whole parquet file")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    corpus = Corpus(tmp_path, val_fraction=0)
    assert corpus.num_chunks(0) == 4
    assert corpus.read_chunk(0, 2) == texts[20:30]
    assert corpus.read_chunk(0, 3) == texts[30:35]
    docs = list(corpus.documents())
    assert [text for _, text in docs] == [t for t in texts if t]
    assert docs[10][0] == DocPosition(0, 1, 1)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "s.parquet")
    with pytest.raises(UsageError, match="'text' column"):
        list(Corpus(tmp_path).documents())


def test_bad_paths_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Corpus(tmp_path / "missing")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(UsageError, match=r"\.jsonl"):
        Corpus(tmp_path)
    with pytest.raises(UsageError, match=r"\.parquet"):
        Corpus(tmp_path / "notes.md")
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(UsageError, match="empty"):
        Corpus(tmp_path)
    with pytest.raises(UsageError):
        Corpus(tmp_path, val_fraction=1.0)


def test_only_blank_documents_is_a_usage_error(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text('\n{"text": "   "}\n\n{"text": ""}\n')
    corpus = Corpus(tmp_path)
    with pytest.raises(UsageError, match="no non-empty"):
        TokenLoader(corpus, tok, 2, 8).next_batch()
    with pytest.raises(UsageError, match="no non-empty"):
        list(iter_texts(corpus, 1000))


# ---- the train / validation split


def test_split_is_disjoint_and_complete(mixed):
    corpus, docs = mixed
    train = [text for _, text in corpus.documents("train")]
    val = [text for _, text in corpus.documents("val")]
    assert not set(train) & set(val)
    assert Counter(train + val) == Counter(docs)
    assert 0.05 * len(docs) < len(val) < 0.3 * len(docs)
    assert sum(text.startswith("txt") for text in val) == round(0.15 * 8)  # .txt files: exact count


def test_split_does_not_depend_on_the_seed_or_the_folder(mixed, tmp_path_factory):
    corpus, _ = mixed
    val = [text for _, text in corpus.documents("val")]
    copy = tmp_path_factory.mktemp("copy")
    for path, name in zip(corpus.files, corpus.names, strict=True):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(path.read_bytes())
    assert [text for _, text in Corpus(copy, val_fraction=0.15).documents("val")] == val


def test_single_document_is_cut_for_validation(tmp_path, tok):
    (tmp_path / "book.txt").write_text("a whole book in one file")
    corpus = Corpus(tmp_path / "book.txt")
    assert len(list(TokenLoader(corpus, tok, 1, 4).next_batch())) == 2
    assert len(list(TokenLoader(corpus, tok, 1, 4, split="val").next_batch())) == 2  # part of it validates
    (tmp_path / "other.jsonl").write_text('{"text": "a second document"}\n')
    both = Corpus(tmp_path)  # with a second document the book is one document again, all of it training
    assert "a whole book in one file" in [text for _, text in both.documents("train")]


# ---- the loader


def test_val_batches_are_the_packed_val_documents_in_order(mixed, tok):
    corpus, _ = mixed
    expected = []
    for _, text in corpus.documents("val"):
        expected += [tok.bos_id] + tok.encode(text)
    B, T = 3, 16
    n = len(expected) // (B * (T + 1))
    assert n >= 2
    loader = TokenLoader(corpus, tok, B, T, split="val")
    got = stream(loader, n + 2)  # goes on past the end: validation starts over
    assert got[: n * B * (T + 1)] == expected[: n * B * (T + 1)]
    assert got[len(expected): len(expected) + 10] == expected[:10]
    assert stream(TokenLoader(corpus, tok, B, T, split="val"), n) == got[: n * B * (T + 1)]


def test_targets_are_inputs_shifted_by_one(mixed, tok):
    corpus, _ = mixed
    loader = TokenLoader(corpus, tok, 4, 24)
    for _ in range(5):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, 24)
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_an_epoch_holds_every_training_document_once_with_bos(mixed, tok):
    corpus, _ = mixed
    train = [text for _, text in corpus.documents("train")]
    total = sum(len(tok.encode(text)) + 1 for text in train)
    B, T = 2, 20
    loader = TokenLoader(corpus, tok, B, T, seed=5)
    tokens = stream(loader, -(-2 * total // (B * (T + 1))))
    epoch0 = split_at_bos(tokens[:total], tok.bos_id)
    epoch1 = split_at_bos(tokens[total:2 * total], tok.bos_id)
    assert Counter(tok.decode(d) for d in epoch0) == Counter(train)
    assert Counter(tok.decode(d) for d in epoch1) == Counter(train)
    order0, order1 = [tok.decode(d) for d in epoch0], [tok.decode(d) for d in epoch1]
    assert order0 != train and order1 != order0  # shuffled, and differently each epoch

    def file_order(texts):  # "txt 3: ..." is its own file; "jsonl0 7: ..." lives in part0.jsonl
        return list(dict.fromkeys(t.split(":")[0] if t.startswith("txt") else t.split()[0] for t in texts))

    assert len(file_order(order0)) == 10  # one of the 8 .txt files is held out
    assert file_order(order0) != file_order(order1)

    def row_groups(texts):  # parquet doc N is in row group N // 5
        numbers = [int(t.split(":")[0].split()[1]) for t in texts if t.startswith("parquet")]
        return list(dict.fromkeys(n // 5 for n in numbers))

    assert sorted(row_groups(order0)) == list(range(6))
    assert row_groups(order0) != row_groups(order1)
    assert loader.epoch == 2  # the last batch reached into the third epoch


def test_same_seed_same_batches_other_seed_other_batches(mixed, tok):
    corpus, _ = mixed
    a, b, c = (TokenLoader(corpus, tok, 2, 16, seed=s) for s in (7, 7, 8))
    batches_a, batches_b, batches_c = ([x.next_batch()[0] for _ in range(6)] for x in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c, strict=True))


@pytest.mark.parametrize("split", ["train", "val"])
def test_resume_gives_exactly_the_uninterrupted_batches(mixed, tok, split):
    corpus, _ = mixed
    B, T, m = 2, 12, 5
    reference = TokenLoader(corpus, tok, B, T, split=split, seed=3)
    batches = [reference.next_batch() for _ in range(130)]  # several epochs
    for k in [*range(0, 20), *range(20, 125, 7)]:
        loader = TokenLoader(corpus, tok, B, T, split=split, seed=3)
        for _ in range(k):
            loader.next_batch()
        state = json.loads(json.dumps(loader.state_dict()))
        assert len(json.dumps(state)) < 300
        resumed = TokenLoader(corpus, tok, B, T, split=split, seed=3)
        resumed.load_state_dict(state)
        for j in range(m):
            inputs, targets = resumed.next_batch()
            assert torch.equal(inputs, batches[k + j][0]) and torch.equal(targets, batches[k + j][1]), (k, j)


def test_resume_does_not_reread_earlier_files(mixed, tok, monkeypatch):
    corpus, _ = mixed
    loader = TokenLoader(corpus, tok, 2, 12, seed=3)
    for _ in range(25):
        loader.next_batch()
    state = loader.state_dict()
    order = data.file_order(corpus, "train", 3, state["epoch"])
    read = []
    original = corpus.read_chunk
    monkeypatch.setattr(corpus, "read_chunk", lambda f, c: read.append(f) or original(f, c))
    resumed = TokenLoader(corpus, tok, 2, 12, seed=3)
    resumed.load_state_dict(state)
    resumed.next_batch()
    assert read[0] == state["position"][0]
    assert all(order.index(f) >= order.index(read[0]) for f in read)


def test_state_from_another_seed_is_refused(mixed, tok):
    corpus, _ = mixed
    state = TokenLoader(corpus, tok, 2, 12, seed=1).state_dict()
    with pytest.raises(UsageError, match="seed"):
        TokenLoader(corpus, tok, 2, 12, seed=2).load_state_dict(state)


def test_bad_loader_arguments(mixed, tok):
    corpus, _ = mixed
    for kwargs in ({"batch_size": 0, "seq_len": 8}, {"batch_size": 2, "seq_len": -1}):
        with pytest.raises(UsageError):
            TokenLoader(corpus, tok, **kwargs)
    with pytest.raises(UsageError):
        TokenLoader(corpus, tok, 2, 8, split="test")


# ---- tokenizer text and the embedded corpus


def test_iter_texts_stops_at_max_chars_and_reads_train_only(mixed):
    corpus, docs = mixed
    val = {text for _, text in corpus.documents("val")}
    texts = list(iter_texts(corpus, 2000, doc_chars=100))
    assert sum(map(len, texts)) == 2000
    assert all(len(text) <= 100 for text in texts)
    for text in texts[:-1]:  # the last one may be cut short enough to be ambiguous
        full = [d for d in docs if d.startswith(text)]
        assert len(full) == 1 and full[0] not in val
    everything = list(iter_texts(corpus, 10**9, doc_chars=10**9))
    assert Counter(everything) == Counter(d for d in docs if d not in val)


def test_embedded_corpus_is_the_stdlib_and_quick(tok):
    started = time.perf_counter()
    corpus = Corpus.embedded()
    inputs, _ = TokenLoader(corpus, tok, 8, 256).next_batch()
    TokenLoader(corpus, tok, 8, 256, split="val").next_batch()
    assert time.perf_counter() - started < 5
    assert inputs[0, 0] == tok.bos_id
    assert len(corpus.files) > 100 and all(name.endswith(".py") for name in corpus.names)
    assert not any(part in ("site-packages", "test", "tests") for n in corpus.names for part in n.split("/"))
    assert "os.py" in corpus.names and "json/decoder.py" in corpus.names
    assert "standard library" in corpus.describe()
    assert 5 <= len(corpus._txt_val) <= 0.05 * len(corpus.files)


def test_each_split_reads_only_files_that_hold_some_of_it(tmp_path, tok, monkeypatch):
    """A shard folder's validation shard sorts last: validation must not decode every training
    shard to reach it, nor training the validation shard; the streams stay what they were."""
    from onecard.datasources import write_manifest

    for i in (0, 1, 2, 1822):
        write_parquet(tmp_path / f"shard_{i:05d}.parquet", make_docs(20, i, f"s{i}"), row_group_size=5)
    write_manifest(tmp_path, {"dataset": "fineweb-edu", "validation": ["shard_01822.parquet"], "files": {}})
    for folder, split, wanted in ((tmp_path, "val", {"shard_01822.parquet"}),
                                  (tmp_path, "train", {"shard_00000.parquet", "shard_00001.parquet",
                                                       "shard_00002.parquet"})):
        corpus = Corpus(folder)
        read = []
        original = corpus.read_chunk
        monkeypatch.setattr(corpus, "read_chunk", lambda f, c, corpus=corpus, original=original, read=read:
                            read.append(corpus.names[f]) or original(f, c))
        loader = TokenLoader(corpus, tok, 2, 16, split=split)
        for _ in range(6):
            loader.next_batch()
        assert set(read) <= wanted and read, (split, set(read))


def test_txt_files_outside_the_split_are_not_read_and_the_stream_is_unchanged(mixed, tok, monkeypatch):
    corpus, _ = mixed
    held = {corpus.names[i] for i in corpus._txt_val}
    assert held
    read = []
    original = corpus.read_chunk
    monkeypatch.setattr(corpus, "read_chunk", lambda f, c: read.append(corpus.names[f]) or original(f, c))
    val = TokenLoader(corpus, tok, 2, 12, split="val")
    batches = [val.next_batch()[0] for _ in range(3)]
    assert not {n for n in read if n.endswith(".txt")} - held  # no training .txt file opened for validation
    monkeypatch.undo()
    # the same validation batches as a walk that reads every file and drops the other split's documents
    monkeypatch.setattr(corpus, "whole_file_split", lambda file: None)
    unskipped = TokenLoader(corpus, tok, 2, 12, split="val")
    assert all(torch.equal(b, unskipped.next_batch()[0]) for b in batches)


def test_an_empty_txt_file_is_never_the_held_out_one(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(make_docs(3, i)), encoding="utf-8")
    for name in ("", "a", "b", "draft", "zz"):  # empty files, whichever hashes first
        (tmp_path / f"empty{name}.txt").write_text("")
    corpus = Corpus(tmp_path, val_fraction=0.2)
    assert corpus._txt_val and all(corpus.sizes[i] for i in corpus._txt_val)


def test_txt_text_is_kept_byte_for_byte_beside_other_files(tmp_path):
    text = "first line\r\nsecond\rthird\r\n" * 50
    (tmp_path / "a.txt").write_bytes(text.encode())
    (tmp_path / "b.txt").write_bytes(text.encode())
    together = Corpus(tmp_path, val_fraction=0)
    assert together.read_chunk(0, 0)[0] == together.read_chunk(1, 0)[0] == text


def test_text_blocks_are_the_lines_starting_in_each_range_and_a_very_long_line_is_cut(tmp_path, monkeypatch):
    """_text_block reads a text file a block at a time without reading any line whole. Where lines
    are shorter than a block it gives what the line reader (_lines, which .jsonl files use) gives."""
    monkeypatch.setattr(textblocks, "BLOCK_BYTES", 64)
    rng = random.Random(0)
    lines = ["".join(rng.choice("abcdé€😀 ") for _ in range(rng.randrange(0, 40))) + "\n" for _ in range(300)]
    path = tmp_path / "lines.txt"
    for text in ("".join(lines), "".join(lines) + "a last line without a line end, crossing a block boundary"):
        path.write_text(text, encoding="utf-8")
        size = path.stat().st_size
        blocks = [textblocks.text_block(path, chunk, size) for chunk in range(-(-size // 64))]
        expected = [b"".join(line for _, line in textblocks.lines(path, c * 64, (c + 1) * 64)).decode()
                    for c in range(len(blocks))]
        assert blocks == expected and "".join(blocks) == text

    long = tmp_path / "long.txt"  # one line of multi-byte characters, far longer than a block
    long.write_text("é€😀x" * 500 + "\nend\n", encoding="utf-8")
    size = long.stat().st_size
    blocks = [textblocks.text_block(long, chunk, size) for chunk in range(-(-size // 64))]
    assert "".join(blocks) == long.read_text(encoding="utf-8")  # no character split, none lost or doubled
    assert all(len(b.encode()) <= 2 * 64 + 4 for b in blocks)  # a block reaches at most a block past its range


def test_a_large_txt_file_beside_others_is_read_in_block_documents(tmp_path, monkeypatch):
    """A .txt file over BIG_TXT_BYTES is read (and tokenized) one block at a time, each block a
    document of its file's split; the corpus's fingerprint says so, so an older run does not resume on it."""
    folder = tmp_path / "texts"
    folder.mkdir()
    big = "".join(f"line {i} of the big text\n" for i in range(400))
    (folder / "big.txt").write_text(big)
    for name in ("small1.txt", "small2.txt", "small3.txt"):
        (folder / name).write_text(f"the small text {name}\n" * 3)
    before = Corpus(folder, val_fraction=0.3).describe()
    monkeypatch.setattr(data, "BIG_TXT_BYTES", 1000)
    monkeypatch.setattr(textblocks, "BLOCK_BYTES", 256)
    corpus = Corpus(folder, val_fraction=0.3)
    assert corpus.describe() != before and "read as" in corpus.describe()
    big_index = corpus.names.index("big.txt")
    split = corpus.whole_file_split(big_index)
    docs = [text for pos, text in corpus.documents(split) if pos.file == big_index]
    assert len(docs) == -(-len(big) // 256) and "".join(docs) == big
    assert all(len(doc) <= 2 * 256 for doc in docs)


@pytest.mark.parametrize("big_name", ["train.txt", "valid.txt", "a.txt", "z.txt"])
def test_a_small_txt_file_is_held_out_rather_than_a_big_one(tmp_path, big_name):
    """Two files, one 100x the other: whichever the name order puts first, the small one is validation."""
    small_name = "b.txt" if big_name != "b.txt" else "c.txt"
    (tmp_path / big_name).write_text("a line of the large training text\n" * 3000)
    (tmp_path / small_name).write_text("a line of the small text\n" * 40)
    corpus = Corpus(tmp_path, val_fraction=0.02)
    held = [corpus.names[i] for i in range(len(corpus.files)) if corpus.whole_file_split(i) == "val"]
    assert held == [small_name]


def test_books_of_similar_size_keep_the_held_out_file_the_names_choose(tmp_path):
    """No book fits in 2 % of five: the size rule would only swap one book for another (and change the
    split of runs started before it), so the count rule stands."""
    for i, size in enumerate((69_952, 68_500, 70_100, 69_000, 68_160)):
        (tmp_path / f"book{i + 1}.txt").write_text("x" * (size - 1) + "\n")
    corpus = Corpus(tmp_path, val_fraction=0.02)
    assert not corpus._txt_val_by_size and len(corpus._txt_val) == 1
    assert "chosen by size" not in corpus.describe()


def test_the_held_out_txt_files_of_the_embedded_corpus_are_chosen_by_count():
    """The size rule steps in only where the count rule holds out far more than the fraction: the
    embedded corpus keeps its split (and its runs resume)."""
    corpus = Corpus.embedded()
    assert not corpus._txt_val_by_size
    assert len(corpus._txt_val) == round(0.02 * sum(1 for s in corpus.sizes if s))
