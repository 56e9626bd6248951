"""Text corpora and the token stream the trainer eats.

A corpus is a file or a folder (searched recursively, in sorted order) of
  .txt      one file = one document (a file over BIG_TXT_BYTES: one document per block),
  .jsonl    one document per line, in its "text" field,
  .parquet  one document per row of a "text" column (FineWeb-EDU's shard layout).
Every document has a stable address (file, chunk, doc): the chunk is a parquet row group, a
1 MiB byte range of a .jsonl file (the lines that start inside it) or of a large .txt file, or 0
for a .txt file. Files are read one chunk at a time, so a parquet shard is never read whole and a
run resumes at its chunk without rereading anything before it.

Whether a document is held out for validation depends only on its address, so the split is the
same on every machine and for every seed. A folder that `onecard data download` filled has a
manifest naming the dataset's own validation shard (FineWeb-EDU's last shard, say): then that
shard is the validation split, whole, and every other file is training text. A corpus whose only
text is one .txt file (a book, say) has no second document to hold out, so its text is cut: read in
1 MiB blocks of whole lines like a .jsonl file, each block cut at line ends into pieces (the
documents), some of each block held out. Several .txt files are held out whole (_held_out_txt).
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from onecard import textblocks
from onecard.datasources import MANIFEST, read_manifest
from onecard.errors import UsageError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
ACCEPTED = (".txt files (one document each), .jsonl files (a 'text' field per line) "
            "or .parquet files (a 'text' column)")
# A larger .txt file is read in blocks (textblocks.BLOCK_BYTES), each a document: one tokenized
# whole would take gigabytes of RAM (a 2 GB text is about 500 M tokens).
BIG_TXT_BYTES = 64 << 20
PIECE_CHARS = 4000  # the longest piece of a cut text: about a web page, as in FineWeb
MIN_PIECE_CHARS = 100  # shorter pieces only when a text has less than two of these
DEFAULT_VAL_FRACTION = 0.02
# Folders of the standard library that are not the standard library's own text, or are test data.
EMBEDDED_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class DocPosition(NamedTuple):
    file: int  # index into Corpus.files
    chunk: int  # parquet row group, jsonl (or cut text) byte block, 0 for txt
    doc: int  # index within the chunk, counting every row or line (empty ones too)


class Corpus:
    """Documents in .txt, .jsonl and .parquet files, addressed by (file, chunk, doc)."""

    def __init__(self, path: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION):
        given = Path(path).expanduser()
        manifest = read_manifest(given) if given.is_dir() else None
        self.val_names = set(manifest["validation"]) if manifest else set()  # the dataset's own split
        if not given.exists():
            raise UsageError(f"corpus {path} does not exist: give a file or folder of {ACCEPTED}")
        if given.is_file():
            if given.suffix not in KINDS:
                kind = given.suffix or "suffix-less"
                raise UsageError(f"corpus {path} is a {kind} file: onecard reads {ACCEPTED}")
            root, files = given.parent, [given]
        else:
            root = given
            files = [
                p for p in given.rglob("*")
                if p.suffix in KINDS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(given).parts)  # .git and the like
            ]
            nested = sorted(p.parent for p in given.rglob(MANIFEST) if p.parent != given)
            if nested:  # read from above, its validation shard would be split like any file, and trained on
                raise UsageError(f"corpus {path} holds a downloaded dataset in {nested[0]}: give that folder as "
                                 "--data, so that its own validation shard is held out")
        kinds = [KINDS[p.suffix] for p in files]
        self._setup(root, files, kinds, str(given), val_fraction)

    @classmethod
    def embedded(cls, val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
        """The default corpus, present wherever Python is: the standard library's own .py sources.

        Each file is one document. Left out: site-packages (third-party code), test folders (test data,
        deliberately odd encodings), __pycache__, and the build-specific _sysconfigdata and config-* files.
        """
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for dirpath, dirnames, filenames in os.walk(stdlib):
            # prune in place so os.walk never descends into site-packages and friends
            dirnames[:] = [d for d in dirnames
                           if d not in EMBEDDED_SKIP_DIRS and not d.startswith((".", "config-"))]
            files += [Path(dirpath, f) for f in filenames
                      if f.endswith(".py") and not f.startswith("_sysconfigdata")]
        if not files:
            raise UsageError(f"found no Python sources under {stdlib} for the embedded corpus: give --data")
        label = f"embedded: Python {platform.python_version()} standard library .py sources in {stdlib}"
        corpus = cls.__new__(cls)
        corpus.val_names = set()
        corpus._setup(stdlib, files, ["txt"] * len(files), label, val_fraction)
        return corpus

    def _setup(self, root: Path, files: list[Path], kinds: list[str], label: str,
               val_fraction: float) -> None:
        if not files:
            started = (root / MANIFEST).exists()  # a download began here and fetched nothing yet
            raise UsageError(f"corpus {label} holds no documents: " + ("its download did not finish a shard: rerun "
                             "`onecard data download` for this folder" if started else f"onecard reads {ACCEPTED}"))
        if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
            raise UsageError(f"validation fraction must be in [0, 1), got {val_fraction!r}")
        order = sorted(range(len(files)), key=lambda i: files[i].relative_to(root).as_posix())
        self.root = root
        self.files = [files[i] for i in order]
        self.kinds = [kinds[i] for i in order]
        self.names = [p.relative_to(root).as_posix() for p in self.files]
        self.label = label
        self.val_fraction = float(val_fraction)
        try:
            self.sizes = [p.stat().st_size for p in self.files]
        except OSError as e:
            raise UsageError(f"cannot read {e.filename}: {e.strerror}") from None
        # pyarrow opens each shard's footer here (not its data): a bad file is named before any work
        self._chunks = {i: _row_groups(p) for i, (p, kind) in enumerate(zip(self.files, self.kinds, strict=True))
                        if kind == "parquet"}
        if not any(self.sizes):
            raise UsageError(f"corpus {label} holds only empty files: onecard reads {ACCEPTED}")
        missing = sorted(self.val_names - set(self.names))
        if missing:
            raise UsageError(f"corpus {label} lacks its validation shard {', '.join(missing)}: rerun "
                             "`onecard data download` for this folder")
        # A .txt file is one document, so a hash threshold would often hold out none of a few files:
        # hold out exactly round(fraction * n) of them (at least one, if there are two or more); an empty
        # file holds nothing to validate on
        txt = [i for i, kind in enumerate(self.kinds) if kind == "txt" and self.sizes[i]]
        self._txt_val, self._txt_val_by_size = _held_out_txt(txt, self.names, self.sizes, self.val_fraction)
        # ... and one .txt file alone cannot be split that way: its text is cut into pieces instead
        holding = [i for i, size in enumerate(self.sizes) if size]
        lone_txt = len(holding) == 1 and self.kinds[holding[0]] == "txt" and self.val_fraction > 0
        self.cut_file = holding[0] if lone_txt else None
        self._big_txt = {i for i in txt if self.sizes[i] > BIG_TXT_BYTES and i != self.cut_file}

    def describe(self) -> str:
        """One line that a run records: what was read, how much, and a fingerprint of the file list."""
        digest = hashlib.blake2b(digest_size=4)
        for name, size in zip(self.names, self.sizes, strict=True):
            digest.update(f"{name}\0{size}\0".encode(errors="surrogateescape"))  # any file name
        cut = ""
        if self.val_names:  # another split than the hash's: a resume must see the change
            digest.update(("validation files\0" + "\0".join(sorted(self.val_names))).encode())
            cut = f", validation split: {', '.join(sorted(self.val_names))}"
        if self.cut_file is not None:  # other documents than the whole file: a resume must see the change
            digest.update(b"text cut into pieces v1\0")
            cut = f", its text cut into pieces of at most {PIECE_CHARS:,} characters"
        if self._big_txt:  # (each such change of what the documents are changes the fingerprint)
            digest.update(b"large text files read in blocks v1\0")
            cut += f", .txt files over {BIG_TXT_BYTES >> 20} MiB read as {textblocks.BLOCK_BYTES >> 20} MiB documents"
        if self._txt_val_by_size:
            digest.update(b"held-out text files chosen by size v1\0")
            cut += ", held-out .txt files chosen by size"
        counts = {kind: self.kinds.count(kind) for kind in dict.fromkeys(self.kinds)}
        what = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return (f"{self.label}: {len(self.files)} files ({what}), {sum(self.sizes) / 1e6:.1f} MB{cut}, "
                f"fingerprint {digest.hexdigest()}, validation fraction {self.val_fraction:g}")

    def num_chunks(self, file: int) -> int:
        if file not in self._chunks:
            blocks = self.kinds[file] == "jsonl" or file == self.cut_file or file in self._big_txt
            self._chunks[file] = textblocks.num_blocks(self.sizes[file]) if blocks else 1
        return self._chunks[file]

    def read_chunk(self, file: int, chunk: int) -> list[str]:
        """The documents of one chunk, in order, empty ones included (so doc indices stay stable)."""
        path, kind = self.files[file], self.kinds[file]
        if kind == "parquet":
            return _read_row_group(path, chunk)
        try:
            if file == self.cut_file:
                return _cut(textblocks.text_block(path, chunk, self.sizes[file]), self.val_fraction)
            if file in self._big_txt:
                return [textblocks.text_block(path, chunk, self.sizes[file])]
            if kind == "txt":  # an empty file is not opened: /proc's files say they are empty, and some hang
                # bytes as they are (no newline translation), as a cut text and .jsonl/.parquet keep them
                return [path.read_bytes().decode("utf-8", errors="replace") if self.sizes[file] else ""]
            return textblocks.jsonl_block(path, chunk)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None

    def whole_file_split(self, file: int) -> str | None:
        """'train' or 'val' where a whole file is one split (a dataset's validation shard, a .txt
        file), None where the split goes document by document: a walk skips the other split's files unread."""
        if self.val_names:
            return "val" if self.names[file] in self.val_names and self.val_fraction > 0 else "train"
        if self.kinds[file] == "txt" and file != self.cut_file:
            return "val" if file in self._txt_val else "train"
        return None

    def held_out(self, file: int, chunk: int, texts: Sequence[str]) -> list[bool]:
        """Which documents of a chunk are validation documents."""
        whole = self.whole_file_split(file)
        if whole is not None:
            return [whole == "val"] * len(texts)
        if file != self.cut_file:
            return [_unit_hash(self.names[file], chunk, doc) < self.val_fraction for doc in range(len(texts))]
        # The pieces of a cut text, like .txt files: exactly round(fraction * n) of a block's non-blank
        # pieces, picked by address; one at least in the first block; one left to train on if it is the only one.
        kept = [doc for doc, text in enumerate(texts) if text.strip()]
        n_val = max(round(self.val_fraction * len(kept)), 1 if chunk == 0 else 0)
        if self.num_chunks(file) == 1:
            if len(kept) < 2:
                raise UsageError(f"{self.files[file]} holds too little text ({self.sizes[file]} bytes) to set some "
                                 "aside for validation: give more text")
            n_val = min(n_val, len(kept) - 1)
        val = set(sorted(kept, key=lambda doc: _unit_hash(self.names[file], chunk, doc))[:n_val])
        return [doc in val for doc in range(len(texts))]

    def documents(self, split: str = "train",
                  start: DocPosition | None = None) -> Iterator[tuple[DocPosition, str]]:
        """One pass over the split's non-empty documents in file order, from `start` if given."""
        check_split(split)
        yield from self._walk(split, range(len(self.files)), lambda f: range(self.num_chunks(f)), start)

    def _walk(self, split: str, file_order: Sequence[int], chunk_order: Callable[[int], Sequence[int]],
              start: DocPosition | None) -> Iterator[tuple[DocPosition, str]]:
        # Begins at `start` by index lookups: nothing before it is read.
        first = _index(file_order, start.file) if start else 0
        for file in file_order[first:]:
            if self.whole_file_split(file) not in (None, split):
                continue  # every document of it is in the other split: not read
            chunks = chunk_order(file)
            at_start = start is not None and file == start.file
            for chunk in chunks[_index(chunks, start.chunk) if at_start else 0:]:
                texts = self.read_chunk(file, chunk)
                held = self.held_out(file, chunk, texts)
                skip = start.doc if at_start and chunk == start.chunk else 0
                for doc in range(skip, len(texts)):
                    if texts[doc].strip() and held[doc] == (split == "val"):
                        yield DocPosition(file, chunk, doc), texts[doc]


def _index(order: Sequence[int], item: int) -> int:
    if item not in order:
        raise UsageError("a saved data position points past the corpus: resume with the same data")
    return order.index(item)


def _unit_hash(name: str, chunk: int, doc: int) -> float:
    """A uniform number in [0, 1) fixed by a document's address."""
    digest = hashlib.blake2b(f"{name}\0{chunk}\0{doc}".encode(errors="surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@contextmanager
def _parquet(path: Path) -> Iterator[pq.ParquetFile]:
    """An open parquet file; pyarrow's errors (which name no file) become one line that does."""
    try:
        with pq.ParquetFile(path) as parquet:
            yield parquet
    except (OSError, ValueError, pa.ArrowException) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # the CLI prints one line
        raise UsageError(f"{path} is not a readable parquet file ({reason})") from None


def _row_groups(path: Path) -> int:
    with _parquet(path) as parquet:
        names = parquet.schema_arrow.names
        if "text" not in names:
            raise UsageError(f"{path} has no 'text' column (it has {', '.join(names)})")
        return parquet.num_row_groups


def check_parquet(path: Path, columns: tuple[tuple[str, ...], ...], strings: str | None = None) -> str:
    """A parquet file that reads: its footer, one of the expected sets of columns, its first and last
    row groups decoded (and `strings`, if named, a column of strings). Returns what was checked;
    ValueError (one line) otherwise. `onecard data download` runs it before a file counts as complete."""
    try:
        with pq.ParquetFile(path) as parquet:
            names = parquet.schema_arrow.names
            wanted = next((c for c in columns if set(c) <= set(names)), None)
            if wanted is None:
                raise ValueError(f"columns {', '.join(names)}: expected {' or '.join(', '.join(c) for c in columns)}")
            groups = parquet.num_row_groups
            for group in sorted({0, groups - 1}) if groups else []:
                table = parquet.read_row_group(group, columns=list(wanted))
                kind = table.column(strings).type if strings else pa.string()
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                    raise ValueError(f"the '{strings}' column holds {kind}, not strings")
            rows = parquet.metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise ValueError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    return f"parquet: {groups} row groups, {rows:,} rows"


def check_shard(path: Path) -> str:
    """A pre-training shard: a parquet file with a 'text' column of strings (check_parquet)."""
    return check_parquet(path, (("text",),), strings="text")


def _read_row_group(path: Path, group: int) -> list[str]:
    with _parquet(path) as parquet:
        column = parquet.read_row_group(group, columns=["text"]).column(0)
    texts = column.to_pylist()
    if any(text is not None and not isinstance(text, str) for text in texts):
        raise UsageError(f"{path}: the 'text' column holds {column.type}, not strings")
    return [text or "" for text in texts]


def _held_out_txt(txt: list[int], names: list[str], sizes: list[int], fraction: float) -> tuple[set[int], bool]:
    """Which of several .txt files are validation files: round(fraction * n) of them (at least one,
    never all) in an order fixed by their names. When those hold more than twice the fraction of
    the text (a big train.txt beside a small valid.txt, say), files are taken in that order while
    they fit in the fraction's bytes instead (the smallest if none does). Also: whether the sizes
    decided."""
    if fraction <= 0 or len(txt) < 2:
        return set(), False
    order = sorted(txt, key=lambda i: _unit_hash(names[i], 0, 0))
    by_count = set(order[:min(max(round(fraction * len(txt)), 1), len(txt) - 1)])
    total = sum(sizes[i] for i in txt)
    if sum(sizes[i] for i in by_count) <= 2 * fraction * total:
        return by_count, False
    by_size, held = set(), 0
    for i in order:
        if held + sizes[i] <= fraction * total and len(by_size) < len(txt) - 1:
            by_size.add(i)
            held += sizes[i]
    if not by_size:
        by_size = {min(order, key=lambda i: sizes[i])}
    if 2 * sum(sizes[i] for i in by_size) > sum(sizes[i] for i in by_count):
        return by_count, False  # not even half as much: the names' choice stands (and older runs resume)
    return by_size, by_size != by_count


def _cut(text: str, val_fraction: float) -> list[str]:
    """`text` in pieces, each ending at a line end unless a line is longer than a piece.

    Pieces are short enough that the held-out ones come near the fraction, at most PIECE_CHARS,
    and under MIN_PIECE_CHARS only to make at least two.
    """
    size = max(-(-len(text) // max(round(1 / val_fraction), 1)), MIN_PIECE_CHARS)
    size = max(min(size, PIECE_CHARS, -(-len(text) // 2)), 1)
    pieces, start = [], 0
    while start < len(text):
        end = start + size
        if end < len(text):
            end = text.rfind("\n", start, end) + 1 or end  # no line end in reach: a fixed-size block
        pieces.append(text[start:end])
        start = end
    return pieces


def check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise UsageError(f"split must be 'train' or 'val', got {split!r}")


def file_order(corpus: Corpus, split: str, seed: int, epoch: int) -> list[int]:
    order = list(range(len(corpus.files)))
    if split == "train":  # validation always reads in file order
        random.Random(f"onecard-files:{seed}:{epoch}").shuffle(order)
    return order


def chunk_order(corpus: Corpus, split: str, seed: int, epoch: int, file: int) -> list[int]:
    order = list(range(corpus.num_chunks(file)))
    if split == "train":
        random.Random(f"onecard-chunks:{seed}:{epoch}:{file}").shuffle(order)
    return order


def iter_texts(corpus: Corpus, max_chars: int, seed: int = 0, doc_chars: int = 10_000) -> Iterator[str]:
    """Training documents for the tokenizer, in the first epoch's shuffled order, `max_chars` in all.

    Each document is cut to `doc_chars` characters (as nanochat does) so no single huge file
    dominates what the tokenizer learns.
    """
    left = max_chars
    docs = corpus._walk("train", file_order(corpus, "train", seed, 0),
                        partial(chunk_order, corpus, "train", seed, 0), None)
    found = False
    for _, text in docs:
        found = True
        if left <= 0:
            return
        text = text[: min(doc_chars, left)]
        left -= len(text)
        yield text
    if not found:
        raise UsageError(f"corpus {corpus.label} has no non-empty training documents")
