"""The token stream of training: documents of a corpus, tokenized and packed into rows, with a
position small enough to store in a checkpoint and restore exactly."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from onecard.data import Corpus, DocPosition, check_split, chunk_order, file_order
from onecard.errors import UsageError
from onecard.tokenizer import Tokenizer


@dataclass
class _Pending:
    epoch: int
    pos: DocPosition
    tokens: list[int]
    offset: int  # tokens already handed out


class TokenLoader:
    """Packs bos-prefixed documents back to back into rows of seq_len + 1 tokens.

    Rows do not overlap: each batch takes the next batch_size * (seq_len + 1) tokens of the stream,
    and a document that does not fit goes on at the start of the next row. Training reads files,
    and the chunks inside each file, in an order shuffled per epoch by (seed, epoch) and loops
    forever; validation reads in file order and starts over when it runs out, so a fresh validation
    loader always yields the same batches.
    """

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 split: str = "train", seed: int = 0):
        check_split(split)
        for name, value in (("batch size", batch_size), ("sequence length", seq_len)):
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if split == "val" and corpus.val_fraction == 0:
            raise UsageError("a validation loader needs a validation fraction above 0")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.batch_size, self.seq_len, self.split, self.seed = batch_size, seq_len, split, seed
        self._restart(0, None, 0)

    def _restart(self, epoch: int, pos: DocPosition | None, offset: int) -> None:
        self._pending: deque[_Pending] = deque()
        self._buffered = 0  # tokens in _pending not yet handed out
        self._cursor = (epoch, pos)  # where reading goes on: the document at pos, or the epoch's start
        self._skip = offset  # tokens of that first document already handed out before a restore
        self._stream = self._documents(epoch, pos)

    def _documents(self, epoch: int, start: DocPosition | None) -> Iterator[tuple[int, DocPosition, str]]:
        while True:
            found = False
            files = file_order(self.corpus, self.split, self.seed, epoch)
            chunks = partial(chunk_order, self.corpus, self.split, self.seed, epoch)
            for pos, text in self.corpus._walk(self.split, files, chunks, start):
                found = True
                yield epoch, pos, text
            if not found and start is None:
                which = "validation" if self.split == "val" else "training"
                raise UsageError(
                    f"corpus {self.corpus.label} has no non-empty {which} documents: give more documents "
                    f"(a .txt file is one document; about {self.corpus.val_fraction:.0%} of them, picked by a hash "
                    "of each, are held out for validation)"
                )
            epoch, start = epoch + 1, None

    @property
    def epoch(self) -> int:
        return self._pending[0].epoch if self._pending else self._cursor[0]

    def _fill(self, want: int) -> None:
        """Tokenize whole documents, several at a time, until at least `want` more tokens are buffered."""
        while self._buffered < want:
            # ~4 characters a token is typical; read a little more so one call usually suffices
            budget, metas, texts = 5 * (want - self._buffered) + 4096, [], []
            while budget > 0 and len(texts) < 256:
                epoch, pos, text = next(self._stream)
                metas.append((epoch, pos))
                texts.append(text)
                budget -= len(text)
            for (epoch, pos), tokens in zip(metas, self.tokenizer.encode_batch(texts, prepend_bos=True),
                                            strict=True):
                item = _Pending(epoch, pos, tokens, self._skip)
                if self._skip >= len(tokens):
                    raise UsageError("the saved data-loader position does not fit this corpus and tokenizer")
                self._skip = 0
                self._pending.append(item)
                self._buffered += len(tokens) - item.offset
            epoch, pos = metas[-1]
            self._cursor = (epoch, DocPosition(pos.file, pos.chunk, pos.doc + 1))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), LongTensors (batch_size, seq_len); targets are the inputs shifted by one."""
        n = self.batch_size * (self.seq_len + 1)
        self._fill(n)
        flat: list[int] = []
        while len(flat) < n:
            head = self._pending[0]
            take = min(n - len(flat), len(head.tokens) - head.offset)
            flat += head.tokens[head.offset:head.offset + take]
            head.offset += take
            self._buffered -= take
            if head.offset == len(head.tokens):
                self._pending.popleft()
        rows = torch.tensor(flat, dtype=torch.long).view(self.batch_size, self.seq_len + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the stream stands: the document being consumed and how many of its tokens are out."""
        if self._pending:
            head = self._pending[0]
            epoch, pos, offset = head.epoch, head.pos, head.offset
        else:
            (epoch, pos), offset = self._cursor, self._skip
        return {
            "split": self.split,
            "seed": self.seed,
            "files": len(self.corpus.files),
            "epoch": epoch,
            "position": None if pos is None else list(pos),  # [file, chunk, doc]; None: start of the epoch
            "offset": offset,  # tokens of that document (its bos included) already handed out
        }

    def load_state_dict(self, state: dict) -> None:
        """Go on exactly where the loader that wrote `state` stood."""
        for key, mine in (("split", self.split), ("seed", self.seed), ("files", len(self.corpus.files))):
            if state.get(key) != mine:
                raise UsageError(
                    f"the saved data-loader state has {key} {state.get(key)!r} but this run has {mine!r}: "
                    "resume with the same data, split and seed"
                )
        pos = state["position"]
        self._restart(int(state["epoch"]), None if pos is None else DocPosition(*map(int, pos)),
                      int(state["offset"]))
