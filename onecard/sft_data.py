"""The conversations SFT trains on: sources mixed by weight, checked, rendered with their mask,
split for validation, and served as batches that resume exactly.

`--data a.jsonl:2 --data b.parquet` takes every conversation of a.jsonl twice per epoch and
those of b.parquet once (a fraction such as `:0.5` takes that share of them). Conversations that
cannot be trained on (roles out of order, an empty assistant turn) are counted and reported with
where the first of each reason is, and those longer than the context are cut and counted; a line
that is not JSON stops with its file and line unless `skip_bad`, which counts it instead.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onecard.conversations import CONVERSATION_SUFFIXES, BadConversation, normalize, read_file, render
from onecard.download import arriving, download_leftover
from onecard.errors import UsageError
from onecard.task_chats import as_conversation
from onecard.tokenizer import Tokenizer
from onecard.units import quantity

DEFAULT_VAL_FRACTION = 0.02
PROGRESS_S = 10.0


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float = 1.0  # epochs of this source per epoch of the mixture

    @classmethod
    def parse(cls, text: str) -> Source:
        """'a.jsonl', 'a.jsonl:2', 'b.parquet:0.5'."""
        path, sep, weight = text.rpartition(":")
        if not sep or not _is_number(weight):
            return cls(Path(text))
        value = float(weight)
        if not 0 < value <= 100:
            raise UsageError(f"--data {text}: the weight after ':' must be above 0 and at most 100")
        return cls(Path(path), value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")


class Conversations:
    """Rendered conversations (ids as int32, mask as int8) of one split, with the counts of what
    was dropped or cut (and where the first of each reason is) and a fingerprint that a resume checks."""

    def __init__(self, rendered: list[tuple[np.ndarray, np.ndarray]], counts: Counter, label: str,
                 borrowed: bool = False, first: dict[str, str] | None = None) -> None:
        self.items, self.counts, self.label, self.first = rendered, counts, label, first or {}
        self.borrowed = borrowed  # validation on a training conversation: too few to hold one out

    def __len__(self) -> int:
        return len(self.items)


def _hash(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key`."""
    digest = hashlib.sha256(key.encode(errors="surrogateescape")).digest()  # any file name
    return int.from_bytes(digest[:8], "big") / 2**64


def _held_out(key: str, fraction: float) -> bool:
    return _hash(key) < fraction


def reason(message: str) -> str:
    """What a drop count groups by: the message up to its first colon outside brackets ("roles out
    of order: message 3 is ..." counts as "roles out of order"), else all of it."""
    depth = 0
    for i, char in enumerate(message):
        depth += (char in "{([") - (char in "})]")
        if char == ":" and depth == 0:
            return message[:i]
    return message


def load(sources: list[Source], tokenizer: Tokenizer, max_tokens: int, val_fraction: float = DEFAULT_VAL_FRACTION,
         skip_bad: bool = False, raw: list | None = None, label: str | None = None,
         say: Callable[[str], None] | None = None) -> tuple[Conversations, Conversations]:
    """(train, val). `raw` gives the conversations directly (the embedded set) instead of files. `say`
    hears how far the reading is every PROGRESS_S seconds: a large set (SmolTalk has 460K) takes a while."""
    counts: Counter = Counter()
    first: dict[str, str] = {}  # reason -> where it first happened, for the user to look

    def drop(why: str, where: str) -> None:
        counts[why] += 1
        first.setdefault(why, where)

    train, val, shares = [], [], {}
    fingerprint = hashlib.sha256()
    last_said = time.monotonic()
    for read, (source, name, number, where, conversation) in enumerate(_each(sources, raw, drop, skip_bad), start=1):
        if say and time.monotonic() - last_said > PROGRESS_S:
            say(f"reading conversations: {read:,} so far ({name})")
            last_said = time.monotonic()
        try:
            rendered = render(tokenizer, normalize(as_conversation(conversation)), max_tokens)
        except BadConversation as error:
            drop(reason(str(error)), where)
            continue
        if not any(rendered.mask[1:]):  # nothing left to learn once cut
            drop("no assistant tokens within the context", where)
            continue
        if rendered.truncated:  # kept, cut: one dropped is counted as dropped alone
            drop("cut at the context", where)
        item = (np.asarray(rendered.ids, dtype=np.int32), np.asarray(rendered.mask, dtype=np.int8))
        fingerprint.update(item[0].tobytes())
        # by file name and line: the same split whatever the weight, wherever the file is kept
        if _held_out(f"{name}:{number}", val_fraction):
            val.append(item)
        else:
            train += [item] * int(source.weight)
            shares.setdefault(source, []).append((_hash(f"share:{name}:{number}"), item))
    for source, items in shares.items():
        train += _share(items, source.weight - int(source.weight))
    if not train:
        raise UsageError(f"no conversation to train on in {label or _names(sources)} ({_report(counts, first)})")
    borrowed = val_fraction > 0 and not val
    if borrowed:
        val = train[-1:]  # a tiny set: validate on one of the training conversations rather than none
    name = label or _names(sources)
    described = f"{name}, fingerprint {fingerprint.hexdigest()[:8]}, validation fraction {val_fraction:g}"
    return Conversations(train, counts, described, first=first), Conversations(val, counts, described, borrowed, first)


def _share(items: list[tuple[float, tuple]], part: float) -> list:
    """The fractional part of a weight: that share of a source's conversations (at least one), the
    same ones on every run, chosen by hash."""
    if not part:
        return []
    count = max(1, round(part * len(items)))
    return [item for _, item in sorted(items, key=lambda pair: pair[0])[:count]]


def _names(sources: list[Source]) -> str:
    return ", ".join(f"{s.path}" + (f":{s.weight:g}" if s.weight != 1 else "") for s in sources)


def _each(sources: list[Source], raw: list | None, drop: Callable[[str, str], None], skip_bad: bool):
    """(source, name, number, where, raw conversation): `name` and `number` (the file's name, or its path
    in a folder source, and the line or row) fix which split a conversation falls in; `where` is what a
    count of drops names ("chats.jsonl, line 3")."""
    if raw is not None:
        for number, conversation in enumerate(raw):
            yield Source(Path("embedded")), "embedded", number, f"embedded conversation {number}", conversation
        return
    for source in sources:
        for path, name in _files(source.path):
            for number, where, conversation in read_file(path):
                if not isinstance(conversation, BadConversation):
                    yield source, name, number, where, conversation
                elif skip_bad:  # counted, and the file goes on
                    drop("not JSON", where)
                else:
                    raise UsageError(f"{conversation} (or give --skip-bad to count such lines and go on)")


def _files(path: Path) -> list[tuple[Path, str]]:
    """A file, or a folder's training files: its train* files, and the files in train* folders, at
    any depth (a downloaded dataset's layout; symbolic links to folders followed), else the
    conversation files directly in it but test*, val* and dev* ones, which are for evaluation. A
    folder file's split name is its own folder's name and its name ("ARC-Easy/train-...parquet"):
    the same split however the folder is named on the command line."""
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        before, colon, _ = str(path).rpartition(":")
        hint = f" ({before} is: the weight after ':' is a number, as in {before}:2)" \
            if colon and Path(before).exists() else ""
        raise UsageError(f"--data {path}: no such file{hint}")
    found = [p for p in _walk(path) if any(part.lower().startswith("train") for part in p.relative_to(path).parts)]
    on_its_way = [p for p in found if arriving(p)]
    if on_its_way:
        raise UsageError(f"--data {path}: {on_its_way[0]} is an unfinished download: finish it (rerun "
                         "`onecard data download`) or remove it")

    def conversation_files(candidates):
        return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in CONVERSATION_SUFFIXES
                      and not download_leftover(p))

    chosen = conversation_files(found) or [
        p for p in conversation_files(path.iterdir()) if not p.name.lower().startswith(("test", "val", "dev"))]
    if not chosen:
        raise UsageError(f"--data {path}: a folder with no training files (.jsonl, .json or .parquet; test*, val* "
                         "and dev* files are left for evaluation)")
    return [(p, f"{p.parent.name}/{p.name}") for p in chosen]


def _walk(folder: Path) -> list[Path]:
    """Every file under `folder`, through symbolic links to folders, each real folder once and never
    one that holds `folder` (a link to a parent would reach files outside it)."""
    top = os.path.realpath(folder)
    seen, files = set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or (root != str(folder) and os.path.commonpath([real, top]) == real):
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files += [Path(root) / name for name in sorted(names)]
    return files


def _report(counts: Counter, first: dict[str, str]) -> str:
    return ", ".join(f"{n:,} {reason} (first: {first[reason]})" for reason, n in sorted(counts.items())) \
        or "none dropped"


def report(train: Conversations, val: Conversations) -> str:
    """One line: how many conversations of each split, and what was dropped or cut and why."""
    borrowed = " (a training one: too few to hold one out)" if val.borrowed else ""
    return (f"{len(train):,} training and {quantity(len(val), 'validation conversation')}{borrowed}; "
            f"{_report(train.counts, train.first)}")


def packed_rows(data: Conversations, width: int) -> int:
    """Rows of `width` tokens one epoch of `data` fills when packed as ConversationBatches packs it: back
    to back, a conversation that does not fit starting the next row, one longer than a row cut."""
    rows, used = 0, 0
    for ids, _ in data.items:
        if used and used + len(ids) > width:
            rows, used = rows + 1, 0
        used += min(len(ids), width - used)
        if used == width:
            rows, used = rows + 1, 0
    return rows + (used > 0)


class ConversationBatches:
    """Micro-batches of `batch_size` conversations in an order shuffled per epoch by (seed, epoch),
    padded to the longest one; targets are -1 where the mask is 0 and on the padding, so only the
    assistant's tokens are learned. With `pack`, conversations go back to back into rows of
    seq_len + 1 tokens instead (as midtraining does), none split across rows."""

    def __init__(self, data: Conversations, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 pack: bool = False, shuffle: bool = True) -> None:
        self.data, self.batch_size, self.seq_len, self.pad_id = data, batch_size, seq_len, pad_id
        self.seed, self.pack, self.shuffle = seed, pack, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.data)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def _peek(self) -> tuple[np.ndarray, np.ndarray]:
        if self.index == len(self._order):  # the next epoch, in its own order
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._make_order()
        return self.data.items[self._order[self.index]]

    def _next_item(self) -> tuple[np.ndarray, np.ndarray]:
        item = self._peek()
        self.index += 1
        return item

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._packed_rows() if self.pack else [self._next_item() for _ in range(self.batch_size)]
        width = self.seq_len + 1 if self.pack else max(len(ids) for ids, _ in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), width), -1, dtype=np.int64)
        for r, (row_ids, row_mask) in enumerate(rows):
            ids[r, :len(row_ids)] = row_ids
            targets[r, :len(row_ids)] = np.where(row_mask == 1, row_ids, -1)
        return torch.from_numpy(ids[:, :-1]).contiguous(), torch.from_numpy(targets[:, 1:]).contiguous()

    def _packed_rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rows, width = [], self.seq_len + 1
        for _ in range(self.batch_size):
            ids_parts, mask_parts, used = [], [], 0
            while used < width:
                ids, mask = self._peek()
                if used and used + len(ids) > width:
                    break  # it starts the next row; this one is padded
                self.index += 1
                ids_parts.append(ids[:width - used])
                mask_parts.append(mask[:width - used])
                used += len(ids_parts[-1])
            rows.append((np.concatenate(ids_parts), np.concatenate(mask_parts)))
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("size") != len(self.data):
            raise UsageError("the saved position in the conversations does not match this data and seed: resume "
                             "with the same --data and --seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order()
