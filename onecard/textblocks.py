"""Text files read a block at a time: a chunk of a .jsonl file, or of a .txt file too large to read
whole (onecard/data.py decides which). A block holds the lines that start in its BLOCK_BYTES of the
file, so a line belongs to one block only; in a .txt block a line longer than a block is cut, at the
start of a character."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from onecard.errors import UsageError

BLOCK_BYTES = 1 << 20  # a block's nominal size
SCAN_BYTES = 4096  # how far a block's boundary looks ahead at a time for a line end


def num_blocks(size: int) -> int:
    return -(-size // BLOCK_BYTES)


def lines(path: Path, begin: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the lines of a file that start at an offset in [begin, end)."""
    with open(path, "rb") as f:
        if begin > 0:
            f.seek(begin - 1)
            f.readline()  # finish the line that started before `begin` (or just eat the newline at begin - 1)
        while f.tell() < end:
            offset = f.tell()
            line = f.readline()
            if not line:
                break
            yield offset, line


def block_start(f, at: int, size: int) -> int:
    """Where the block nominally starting at byte `at` of an open file begins: after the first line
    end at `at` - 1 or later (so a block holds the lines that start in its range, as lines() gives
    them), or, when no line ends within BLOCK_BYTES, at the first character that starts at `at` or
    later: a line that long is cut, and no line is ever read whole."""
    if at <= 0 or at >= size:
        return max(0, min(at, size))
    f.seek(at - 1)
    scanned = 0  # read in small pieces: a line end is usually a few bytes away
    while scanned < BLOCK_BYTES:
        piece = f.read(min(SCAN_BYTES, BLOCK_BYTES - scanned))
        newline = piece.find(b"\n")
        if newline >= 0:
            return at + scanned + newline
        scanned += len(piece)
        if not piece or at - 1 + scanned >= size:  # the file's last line, without a line end, started before
            return size  # `at`: it belongs to the block it starts in (as lines() gives it), not cut at `at`
    f.seek(at)
    head = f.read(4)  # a UTF-8 character is at most 4 bytes; continuation bytes are 0b10xxxxxx
    return at + next((i for i, byte in enumerate(head) if byte & 0xC0 != 0x80), len(head))


def text_block(path: Path, chunk: int, size: int) -> str:
    """Block `chunk` of a text file: from its start to the next block's (see block_start)."""
    with open(path, "rb") as f:
        begin = block_start(f, chunk * BLOCK_BYTES, size)
        end = block_start(f, (chunk + 1) * BLOCK_BYTES, size)
        f.seek(begin)
        return f.read(end - begin).decode("utf-8", errors="replace")


def jsonl_block(path: Path, chunk: int) -> list[str]:
    """The "text" of each line of a .jsonl file that starts in block `chunk` ('' for a blank line)."""
    texts = []
    for offset, line in lines(path, chunk * BLOCK_BYTES, (chunk + 1) * BLOCK_BYTES):
        if not line.strip():
            texts.append("")
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or not UTF-8
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path}, line {line_number(path, offset)}: not a JSON object with a 'text' string")
        texts.append(record["text"])
    return texts


def line_number(path: Path, offset: int) -> int:
    """The number (from 1) of the line that starts at byte `offset`: counted only for an error message."""
    newlines = 0
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(offset, 1 << 24))):
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1
