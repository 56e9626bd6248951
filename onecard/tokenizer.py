"""The BPE tokenizer: trained with rustbpe, run with tiktoken, stored the way nanochat stores it.

Training and splitting follow nanochat: GPT-4's split pattern with numbers cut into groups of at
most two digits, byte-level BPE, and nine special tokens whose ids come right after the merges.
A tokenizer directory holds `tokenizer.json` (plain data, what onecard reads first) and
`tokenizer.pkl` (a pickled tiktoken Encoding, what nanochat reads). Pickles are only ever opened
through `load_tiktoken_pickle`, which refuses anything but a tiktoken Encoding.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import regex
import rustbpe
import tiktoken
import torch

from onecard import durable
from onecard.errors import UsageError

# nanochat's split pattern: GPT-4's, except \p{N}{1,2} where GPT-4 has \p{N}{1,3}
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
JSON_NAME = "tokenizer.json"
PICKLE_NAME = "tokenizer.pkl"
JSON_FORMAT = "onecard-tokenizer"
ENCODING_NAME = "onecard"
SMALLEST_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the specials and one merge
LARGEST_VOCAB = 2**31 - 1  # rustbpe and tiktoken count tokens in 32 bits; no model needs more


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    """A lone surrogate (a half emoji, as JSON's "\\ud83d" loads) turned into U+FFFD, as tiktoken's
    encode does; rustbpe's training cannot take one and stops."""
    if not LONE_SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens, plus training and storage."""

    def __init__(self, enc: tiktoken.Encoding):
        missing = [name for name in SPECIAL_TOKENS if name not in enc.special_tokens_set]
        if missing:
            raise UsageError(f"tokenizer {enc.name!r} lacks the special tokens {', '.join(missing)}")
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}

    # ---- training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn BPE merges from `texts` so that merges + specials make exactly `vocab_size` tokens."""
        check_vocab_size(vocab_size)  # before any text is read
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(map(_without_surrogates, texts), n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        # rustbpe stops early when no pair occurs twice any more: the text is too small for the ask
        if len(ranks) < n_ranks:
            reachable = len(ranks) + len(SPECIAL_TOKENS)
            raise UsageError(
                f"the training text supports a vocabulary of only {reachable:,} tokens, not {vocab_size:,}: "
                f"lower --vocab-size to at most {reachable:,} or give more text"
            )
        return cls(_make_encoding(ENCODING_NAME, SPLIT_PATTERN, ranks))

    # ---- encoding

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        if name not in self._special_ids:
            raise UsageError(f"unknown special token {name!r}: they are {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[name]

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        """Ordinary text: a "<|bos|>" inside the text is spelled out, never turned into the token."""
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: list[str], prepend_bos: bool = False) -> list[list[int]]:
        """Like encode on each text, in tiktoken's threads."""
        batch = self.enc.encode_ordinary_batch(list(texts))
        if prepend_bos:
            batch = [[self.bos_id, *ids] for ids in batch]
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token stands for (0 for specials): turns nats per token into bits per byte."""
        specials = set(self._special_ids.values())
        counts = [
            0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)
        ]
        return torch.tensor(counts, dtype=torch.int64)

    def same_as(self, other: Tokenizer) -> bool:
        """The same split pattern, tokens and ids: any text encodes to the same ids with either."""
        mine, theirs = self.enc, other.enc
        return (mine._pat_str == theirs._pat_str and mine._mergeable_ranks == theirs._mergeable_ranks
                and mine._special_tokens == theirs._special_tokens)

    # ---- storage

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (plain data) and tokenizer.pkl (nanochat's pickled Encoding)."""
        directory = Path(directory)
        check_save_folder(directory)
        specials = set(self._special_ids.values())
        ranks = [i for i in range(self.vocab_size) if i not in specials]
        data = {
            "format": JSON_FORMAT,
            "version": 1,
            "name": self.enc.name,
            "pattern": self.enc._pat_str,
            "special_tokens": dict(self._special_ids),
            # [token bytes as base64, rank], in rank order
            "mergeable_ranks": [
                [base64.b64encode(self.enc.decode_single_token_bytes(i)).decode("ascii"), i] for i in ranks
            ],
        }
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # on disk before training goes on: a run cannot resume without its tokenizer, and no checkpoint holds it
            durable.write_bytes(directory / JSON_NAME, (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8"))
            durable.write_bytes(directory / PICKLE_NAME, pickle.dumps(self.enc))
            durable.fsync_dir(directory)
        except OSError as e:
            raise UsageError(f"cannot save the tokenizer in {directory}: {e.strerror or e}") from None

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read tokenizer.json if there is one, else a nanochat tokenizer.pkl through the safe loader.

        `directory` may also name one of those two files.
        """
        directory = Path(directory)
        if directory.is_file() and directory.suffix in (".json", ".pkl"):
            read = _read_json if directory.suffix == ".json" else load_tiktoken_pickle
            return cls(read(directory))
        if (directory / JSON_NAME).is_file():
            try:
                return cls(_read_json(directory / JSON_NAME))
            except UsageError as damaged:
                if not (directory / PICKLE_NAME).is_file():
                    raise
                # save() writes both: the pickle holds the same tokenizer (a model expecting another
                # vocabulary is still refused by its size)
                print(f"note: {damaged}; reading {directory / PICKLE_NAME} instead", file=sys.stderr)
        if (directory / PICKLE_NAME).is_file():
            return cls(load_tiktoken_pickle(directory / PICKLE_NAME))
        raise UsageError(f"no tokenizer in {directory}: expected {JSON_NAME} or {PICKLE_NAME} there")


def check_save_folder(directory: str | Path, replace: bool = True) -> None:
    """UsageError if `directory` or a folder above it is a file, or (replace=False) it already holds a
    tokenizer: call it before training, not after."""
    directory = Path(directory)
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot save the tokenizer in {directory}: {blocker} is a file, not a folder")
    held = next((name for name in (JSON_NAME, PICKLE_NAME) if (directory / name).exists()), None)
    if held and not replace:
        raise UsageError(f"{directory} already holds a tokenizer ({held}): give another --out, or --force to "
                         "replace it")


def check_vocab_size(vocab_size: object) -> None:
    """A vocabulary BPE can make: the 256 bytes, the special tokens and at least one merge."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UsageError(f"vocab size must be a whole number, got {vocab_size!r}")
    if not SMALLEST_VOCAB <= vocab_size <= LARGEST_VOCAB:
        raise UsageError(
            f"vocab size must be between {SMALLEST_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens + "
            f"1 merge) and {LARGEST_VOCAB:,}, got {vocab_size:,}"
        )


def _make_encoding(name: str, pattern: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def _read_json(path: Path) -> tiktoken.Encoding:
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise ValueError("no 'format': 'onecard-tokenizer' in it")
        pairs = data["mergeable_ranks"]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in pairs}
        if len(ranks) != len(pairs):
            raise ValueError("a token appears twice")
        specials = {str(name): int(i) for name, i in data["special_tokens"].items()}
        if not isinstance(data["name"], str) or not isinstance(data["pattern"], str):
            raise ValueError("name and pattern must be strings")
        _check_vocabulary(ranks, specials)
        _check_pattern(data["pattern"])
        return tiktoken.Encoding(name=data["name"], pat_str=data["pattern"], mergeable_ranks=ranks,
                                 special_tokens=specials)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UsageError(f"{path} is not an onecard tokenizer file ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    """What an error says, on one line: the command line prints a UsageError as a single line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_vocabulary(ranks: dict[bytes, int], specials: dict[str, int]) -> None:
    """Byte-level BPE as onecard and nanochat lay it out, or ValueError: tiktoken would panic or
    misnumber tokens on anything else (a byte without a rank, gaps, specials among the merges)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("the merge ranks are not 0, 1, 2, ... without gaps")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("not every single byte has a rank")
    if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
        raise ValueError("the special tokens' ids do not come right after the merges")


# Letters, digits, punctuation, spaces and line ends, ASCII and not: what a split pattern sorts
PATTERN_PROBE = "Hello, World! It's 42 -- naïve café 東京 😀\n\n\tx = 1+2;  end \r\n"


def _check_pattern(pattern: str) -> None:
    """ValueError for a split pattern that matches empty text somewhere: tiktoken panics on such text
    (a Rust panic, which no caller catches) instead of encoding it. One `regex` cannot compile is
    left to tiktoken, whose engine differs and says what is wrong itself."""
    try:
        compiled = regex.compile(pattern)
    except regex.error:
        return
    if any(match.start() == match.end() for match in compiled.finditer(PATTERN_PROBE)):
        raise ValueError(f"its split pattern {pattern!r} matches empty text, which tiktoken cannot encode")


# ---- reading nanochat's tokenizer.pkl without running whatever a pickle may ask for


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state, runs nothing."""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _TiktokenUnpickler(pickle.Unpickler):
    # A tiktoken Encoding pickled with protocol 3 or later (Python 3's default) names exactly one
    # global, tiktoken.core.Encoding; its state is a dict of str, bytes and int (see pickletools.dis).
    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> type:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise UsageError(
            f"onecard refuses to load {self.path}: it asks for {module}.{name}, which a tokenizer never needs"
        )


def load_tiktoken_pickle(path: str | Path) -> tiktoken.Encoding:
    """Load a pickled tiktoken Encoding (nanochat's tokenizer.pkl) and nothing else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _TiktokenUnpickler(f, path).load()
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or garbled files fail in many ways
        raise UsageError(f"{path} is not a pickled tiktoken Encoding ({type(e).__name__}: {_first_line(e)})") from None
    state = getattr(obj, "state", None) if isinstance(obj, _EncodingState) else None
    if not _is_encoding_state(state):
        raise UsageError(f"{path} is not a pickled tiktoken Encoding holding its merges and special tokens")
    try:
        _check_vocabulary(state["mergeable_ranks"], state["special_tokens"])
        _check_pattern(state["pat_str"])
        return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                                 mergeable_ranks=state["mergeable_ranks"], special_tokens=state["special_tokens"])
    except ValueError as e:
        raise UsageError(f"{path} is not a usable tokenizer ({_first_line(e)})") from None


def _is_encoding_state(state: object) -> bool:
    # A bare name (a registered encoding pickled by reference) would need a download: refused too.
    if not isinstance(state, dict) or set(state) != {"name", "pat_str", "mergeable_ranks", "special_tokens"}:
        return False
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    return (
        isinstance(state["name"], str)
        and isinstance(state["pat_str"], str)
        and isinstance(ranks, dict)
        and all(type(k) is bytes and type(v) is int for k, v in ranks.items())
        and isinstance(specials, dict)
        and all(type(k) is str and type(v) is int for k, v in specials.items())
    )
