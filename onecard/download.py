"""Dependable downloads of large files over plain HTTP(S): parallel, resumable, verified, atomic.

A file NAME is fetched into NAME.part, with NAME.part.json beside it (the URL, the size the server
announced, its validator and checksum). A dropped connection, a stall (no byte for `timeout_s`), a
5xx or a 429 is retried after an exponential backoff or the server's Retry-After, and the transfer
goes on from the bytes already on disk with a Range request (If-Range guards against a file that
changed meanwhile). A finished part is checked — its size against the announced length, its
SHA-256 where the server gives one (Hugging Face's X-Linked-Etag), its content by the caller's check
(a parquet footer and row groups, a zip's CRCs) — and only then renamed to NAME. So a NAME without
.part is always a complete, verified file, and a rerun skips it.

Standard library only (urllib in threads): no dependency for the one job of moving bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from pathlib import Path

from onecard import durable
from onecard.byteprogress import Progress
from onecard.errors import UsageError
from onecard.hashing import sha256

USER_AGENT = "onecard-download/1"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
UNSATISFIED_RANGE = re.compile(r"^bytes \*/(\d+)$")
# Hugging Face's resolve endpoint names the stored file's SHA-256 and size on its redirect:
# huggingface_hub constants.py (HUGGINGFACE_HEADER_X_LINKED_ETAG = "X-Linked-Etag", X_LINKED_SIZE).
LINKED_ETAG, LINKED_SIZE = "X-Linked-Etag", "X-Linked-Size"


class DownloadError(UsageError):
    """A file that could not be fetched whole: one line, exit 2, nothing partial kept as complete."""


@dataclass(frozen=True)
class Settings:
    workers: int = 4
    attempts: int = 8  # failed attempts in a row that add no new byte, before a file is given up
    timeout_s: float = 60.0  # a connection silent this long is stalled: dropped and resumed
    backoff_s: float = 2.0  # the first wait; doubles with each failure
    backoff_max_s: float = 120.0
    retry_after_max_s: float = 900.0  # the longest Retry-After honoured as asked
    chunk_bytes: int = 1 << 20
    reserve_bytes: int = 1 << 30  # disk left free for everything else
    checksums: bool = True  # verify the SHA-256 a Hugging Face server names (X-Linked-Etag)


@dataclass
class Job:
    url: str
    dest: Path
    estimate: float  # bytes, until the server says
    check: Callable[[Path], str] | None = None  # content check: a short description, or ValueError
    label: str = ""  # how messages name the file (default its name; a chat set's file, its path)

    @property
    def name(self) -> str:
        return self.label or self.dest.name


@dataclass
class Result:
    job: Job
    size: int
    checks: list[str] = field(default_factory=list)  # what was verified
    sha256: str | None = None
    retries: int = 0


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


class _Cancelled(Exception):
    pass


class Cancel(threading.Event):
    """Ctrl-C for the workers: set, it also shuts the sockets they are reading from, so that a worker
    waiting on a slow server stops at once instead of after its stall timeout."""

    def __init__(self):
        super().__init__()
        self._reading: set = set()
        self._lock = threading.Lock()

    @contextmanager
    def watch(self, response) -> Iterator[None]:
        with self._lock:
            self._reading.add(response)
        try:
            yield
        finally:
            with self._lock:
                self._reading.discard(response)

    def set(self) -> None:
        super().set()
        with self._lock:
            for response in self._reading:
                # http.client's response reads from a socket file: fp.raw._sock (CPython since 3.0)
                sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except (AttributeError, OSError):
                    pass  # then the worker stops at its next byte or its stall timeout


PART_SUFFIXES = (".part", ".part.json")  # a file on its way, and its resume state


def part_paths(dest: Path) -> tuple[Path, Path]:
    part = dest.with_name(dest.name + PART_SUFFIXES[0])
    return part, dest.with_name(dest.name + PART_SUFFIXES[1])


def arriving(path: Path) -> bool:
    """Whether `path` is a file still on its way (NAME.part)."""
    return path.name.endswith(PART_SUFFIXES[0])


def download_leftover(path: Path) -> bool:
    """Whether `path` is one of a download's own files (NAME.part, NAME.part.json): never data."""
    return path.name.endswith(PART_SUFFIXES)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------- one file

class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does (Range and If-Range go along), and hands the final response
    the checksum headers that a redirect carried (Hugging Face puts them on its 302)."""

    def http_error_302(self, req, fp, code, msg, headers):
        linked = {k: headers[k] for k in (LINKED_ETAG, LINKED_SIZE) if headers.get(k)}
        response = super().http_error_302(req, fp, code, msg, headers)
        if response is not None:
            response.linked = {**linked, **getattr(response, "linked", {})}  # the hop nearest the file wins
        return response

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_Redirects)


def fetch(job: Job, settings: Settings, progress: Progress, cancel: Cancel) -> Result:
    """Fetch one file to job.dest, verified, or raise _Fatal / _Cancelled (the .part stays for a rerun)."""
    part, side = part_paths(job.dest)
    failures, furthest, retries = 0, _size(part), 0
    while True:
        if cancel.is_set():
            raise _Cancelled()
        try:
            _transfer(job, part, side, settings, progress, cancel)
            result = _finish(job, part, side, progress)
            result.retries = retries
            return result
        except _Retry as retry:
            retries += 1
            if _size(part) > furthest:  # it got further than ever: not a failure that counts
                furthest = _size(part)
            else:
                failures += 1
            if failures >= settings.attempts:
                raise _Fatal(f"{job.name}: {retry} ({failures} failed attempts)") from None
            delay = _delay(retry, failures, settings)
            progress.note(f"{job.name}: {retry}; retrying in {delay:.1f} s")
            if cancel.wait(delay):
                raise _Cancelled() from None
        except OSError as e:  # the disk, not the network: the network's errors are _Retry
            raise _Fatal(f"{job.name}: cannot write in {job.dest.parent} ({e.strerror or e})") from None


def _delay(retry: _Retry, failures: int, s: Settings) -> float:
    if retry.retry_after is not None:
        return min(max(retry.retry_after, 0.0), s.retry_after_max_s)
    backoff = min(s.backoff_s * 2 ** max(failures - 1, 0), s.backoff_max_s)
    return backoff * random.uniform(0.75, 1.25)  # jitter: parallel workers do not retry in lockstep


def _transfer(job: Job, part: Path, side: Path, s: Settings, progress: Progress, cancel: Cancel) -> None:
    """One attempt: append what the server sends to the .part, or raise _Retry / _Fatal."""
    meta = _read_side(side, job.url)
    if not meta and part.exists():  # bytes of unknown origin: start over
        progress.advance(-_size(part))
        part.unlink()
    have = _size(part)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    response = _open(job, headers, s.timeout_s, have, meta, part, side, progress)
    if response is None:  # the part is already whole (416 with the same size)
        return
    with response:
        total, meta = _accept(response, job, have, meta, part, side, progress, s.checksums)
        _check_room(job, part.parent, (total or job.estimate) - _size(part), s)
        with cancel.watch(response):
            _copy(response, part, total, s, progress, cancel)
    got = _size(part)
    if total is not None and got < total:
        raise _Retry(f"connection closed at {got:,} of {total:,} bytes")


def _open(job: Job, headers: dict, timeout: float, have: int, meta: dict, part: Path, side: Path,
          progress: Progress):
    request = urllib.request.Request(job.url, headers=headers)
    try:
        return _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            code, after, ranged = e.code, _retry_after(e.headers.get("Retry-After")), e.headers.get("Content-Range")
        if code == 416 and have:
            m = UNSATISFIED_RANGE.match(ranged or "")
            if m and int(m.group(1)) == have == meta.get("size"):
                return None
            _discard(part, side, progress)
            raise _Retry("the server's copy differs from the partial file: starting over") from None
        if code in RETRY_STATUS:
            raise _Retry(f"HTTP {code} {e.reason}", after) from None
        raise _Fatal(f"{job.name}: HTTP {code} {e.reason} from {job.url}") from None
    except (urllib.error.URLError, HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME:  # not a passing failure
            raise _Fatal(f"{job.name}: the host {urllib.parse.urlsplit(job.url).hostname} is not known "
                         "(check the address, or this machine's network)") from None
        raise _Retry(_network_reason(e)) from None


def _accept(response, job: Job, have: int, meta: dict, part: Path, side: Path, progress: Progress,
            checksums: bool) -> tuple[int | None, dict]:
    """Check the response fits the partial file; record what the server says the file is."""
    linked = getattr(response, "linked", {}) or {}
    headers = response.headers
    length = _int(headers.get("Content-Length"))
    if response.status == 206:
        m = CONTENT_RANGE.match(headers.get("Content-Range") or "")
        total = _int(m.group(3)) if m else None
        if not m or int(m.group(1)) != have or (meta.get("size") and total != meta["size"]):
            _discard(part, side, progress)
            raise _Retry("the server resumed at the wrong place or with another size: starting over")
    elif response.status == 200:
        total = length
        if have:  # the server ignored the Range (or the file changed): the whole file comes again
            progress.advance(-have)
            part.unlink(missing_ok=True)
    else:
        raise _Retry(f"unexpected HTTP {response.status}")
    linked_size = _int(linked.get(LINKED_SIZE) or headers.get(LINKED_SIZE))
    if total is None and linked_size is not None:
        total = linked_size
    etag = (headers.get("ETag") or "").strip()
    # Only Hugging Face's X-Linked-Etag is taken as a SHA-256: a plain ETag may be any hash (a Xet
    # hash on Hugging Face's own CDN, an MD5 or a multipart tag on S3), so it only guards the If-Range.
    sha = _sha_from(linked.get(LINKED_ETAG) or headers.get(LINKED_ETAG)) if checksums else None
    meta = {"url": job.url, "size": total, "linked_size": linked_size, "sha256": sha,
            "validator": etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")}
    _write_side(side, meta)
    if total is not None:
        progress.resize(job, total)
    return total, meta


def _copy(response, part: Path, total: int | None, s: Settings, progress: Progress,
          cancel: Cancel) -> None:
    at = _size(part)
    with open(part, "ab") as f:
        try:
            while total is None or at < total:
                if cancel.is_set():
                    raise _Cancelled()
                try:
                    chunk = response.read(s.chunk_bytes)
                except TimeoutError:
                    raise _Retry(f"stalled: nothing received for {s.timeout_s:g} s") from None
                except (HTTPException, OSError) as e:
                    raise _Retry(_network_reason(e)) from None
                if not chunk:
                    break
                f.write(chunk)
                at += len(chunk)
                progress.advance(len(chunk))
        finally:
            f.flush()
            os.fsync(f.fileno())


def _finish(job: Job, part: Path, side: Path, progress: Progress) -> Result:
    """Verify the whole .part, then rename it into place; a bad one is deleted and fetched again."""
    meta = _read_side(side, job.url)
    size, checks, digest = _size(part), [], None
    for announced in (meta.get("size"), meta.get("linked_size")):
        if announced is not None and size != announced:
            _discard(part, side, progress)
            raise _Retry(f"got {size:,} bytes where the server announced {announced:,}: fetching it again")
    if meta.get("size") is not None:
        checks.append(f"size {size:,} B")
    if meta.get("sha256"):
        digest = sha256(part)
        if digest != meta["sha256"]:
            _discard(part, side, progress)
            raise _Retry("SHA-256 differs from the server's: fetching it again")
        checks.append("SHA-256")
    if job.check is not None:
        try:
            checks.append(job.check(part))
        except ValueError as e:
            _discard(part, side, progress)
            raise _Retry(f"the file is damaged ({e}): fetching it again") from None
    os.replace(part, job.dest)
    durable.fsync_dir(job.dest.parent)
    side.unlink(missing_ok=True)
    return Result(job, size, checks, digest)


def _discard(part: Path, side: Path, progress: Progress) -> None:
    progress.advance(-_size(part))
    part.unlink(missing_ok=True)
    side.unlink(missing_ok=True)


def _check_room(job: Job, folder: Path, need: float, s: Settings) -> None:
    free = shutil.disk_usage(folder).free
    if need > 0 and free - need < s.reserve_bytes / 4:  # the up-front check kept the whole reserve
        raise _Fatal(f"{job.name}: the disk is nearly full ({free / 1e9:.1f} GB free in {folder}, "
                     f"{need / 1e9:.1f} GB still to come)")


# ---------------------------------------------------------------- small helpers

def _read_side(side: Path, url: str) -> dict:
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("url") == url else {}


def _write_side(side: Path, meta: dict) -> None:
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, side)


def _int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _sha_from(etag: str | None) -> str | None:
    value = (etag or "").strip().removeprefix("W/").strip('"').lower()
    return value if SHA256_HEX.match(value) else None


def _retry_after(text: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP date), None if absent or unreadable."""
    if not text:
        return None
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _network_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    text = str(reason).strip() or type(reason).__name__
    return f"network error ({text.splitlines()[0]})"


# ---------------------------------------------------------------- many files

def check_disk(folder: Path, need: float, settings: Settings, what: str) -> None:
    """UsageError before any byte moves if `need` bytes (plus the reserve) do not fit in `folder`."""
    free = shutil.disk_usage(folder).free
    if free < need + settings.reserve_bytes:
        raise UsageError(f"{folder} has {free / 1e9:.1f} GB free but {what} need about {need / 1e9:.1f} GB "
                         f"(and {settings.reserve_bytes / 1e9:.1f} GB are kept free): free some space or "
                         "download fewer shards")


def download_all(jobs: Sequence[Job], settings: Settings, progress: Progress) -> tuple[list[Result], list[str]]:
    """Fetch the jobs, `settings.workers` at a time: (results, one-line reasons of the files that failed).

    Ctrl-C stops every worker within one chunk (or one stall timeout), keeps their .part files for
    the next run, and re-raises KeyboardInterrupt.
    """
    cancel = Cancel()
    results: list[Result] = []
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="onecard-download") as pool:
        pending = {pool.submit(fetch, job, settings, progress, cancel) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        result = future.result()
                    except _Fatal as e:
                        failed.append(str(e))
                        continue
                    results.append(result)
                    progress.file_done(result)
        except BaseException:  # Ctrl-C (or anything else): stop the workers before leaving
            cancel.set()
            for future in pending:
                future.cancel()
            raise
    return results, failed
