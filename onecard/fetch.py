"""What `onecard data download` fetches, and what it does around the transfer: which shards, which
are already complete, the disk they need, the folder's manifest, the eval bundle's unpacking.
The bytes themselves move in onecard/download.py."""

from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from filelock import FileLock, Timeout

from onecard import datasources as ds
from onecard.byteprogress import Progress
from onecard.data import check_parquet, check_shard
from onecard.download import DownloadError, Job, Result, Settings, check_disk, download_all, part_paths
from onecard.errors import UsageError

Say = Callable[[str], None]


@dataclass
class Survey:
    """A shard folder against a list of wanted shards."""

    complete: dict[str, dict] = field(default_factory=dict)  # name -> manifest record
    jobs: list[Job] = field(default_factory=list)
    partial_bytes: int = 0
    damaged: list[str] = field(default_factory=list)

    @property
    def need_bytes(self) -> float:
        return max(sum(job.estimate for job in self.jobs) - self.partial_bytes, 0.0)


def survey(shard_set: ds.ShardSet, folder: Path, indices: list[int], base_url: str | None,
           recorded: dict, dry_run: bool) -> Survey:
    """Which wanted shards are complete (recorded with the same size, or passing the shard check) and
    which must be fetched. A damaged file is moved aside to NAME.damaged (kept where it is in a dry run)."""
    out = Survey()
    for index in indices:
        name = shard_set.filename(index)
        dest = folder / name
        if dest.is_file():
            size = dest.stat().st_size
            if (recorded.get(name) or {}).get("bytes") == size:
                out.complete[name] = recorded[name]
                continue
            try:  # not recorded by a download of ours (nanochat's, or copied in): check it now
                out.complete[name] = {"bytes": size, "checks": ["size", check_shard(dest)]}
                continue
            except ValueError as e:
                out.damaged.append(f"{name} ({e})")
                if not dry_run:
                    os.replace(dest, dest.with_name(name + ".damaged"))
        part, _ = part_paths(dest)
        out.partial_bytes += part.stat().st_size if part.is_file() else 0
        out.jobs.append(Job(shard_set.url(index, base_url), dest, shard_set.shard_bytes, check_shard))
    return out


def download_shards(shard_set: ds.ShardSet, folder: Path, train_shards: int, settings: Settings,
                    base_url: str | None = None, dry_run: bool = False, say: Say = print,
                    stream=None) -> dict:
    """Bring `folder` to hold the validation shard and training shards 0 .. train_shards-1, each verified.

    Returns the manifest; raises DownloadError (one line) if some file could not be fetched whole.
    """
    folder = Path(folder).expanduser()
    _check_folder(folder)
    manifest = ds.read_manifest(folder) or {}
    if manifest.get("dataset") not in (None, shard_set.name):
        raise UsageError(f"{folder} holds {manifest['dataset']} shards: give another --dir for {shard_set.name}")
    indices = shard_set.indices(train_shards)
    found = survey(shard_set, folder, indices, base_url, manifest.get("files") or {}, dry_run)
    val = shard_set.filename(shard_set.last)
    say(f"{shard_set.title}: {len(indices):,} files = {train_shards:,} training shards "
        f"(shard_00000 .. {shard_set.filename(train_shards - 1)[:-8]}) + {val[:-8]} for validation")
    say(f"source: {shard_set.url(0, base_url)}, ...")
    partial = f" ({ds.format_bytes(found.partial_bytes)} of it already in .part files)" if found.partial_bytes else ""
    free = shutil.disk_usage(_existing(folder)).free
    say(f"in {folder}: {len(found.complete):,} complete, {len(found.jobs):,} to fetch, about "
        f"{ds.format_bytes(found.need_bytes)} to download{partial} (estimated at "
        f"~{ds.format_bytes(shard_set.shard_bytes)} a shard until the server says); {ds.format_bytes(free)} free there")
    for damaged in found.damaged:
        say(f"damaged, fetched again: {damaged}")
    record = {"dataset": shard_set.name, "base_url": base_url or ds.hugging_face(shard_set.base_url),
              "validation": [val], "files": {**_records(manifest, found), **found.complete}}
    if dry_run:
        say("dry run: nothing downloaded")
        return record
    if not found.jobs:
        if folder.is_dir():
            ds.write_manifest(folder, record)
        say(f"nothing to do: all {len(indices):,} files are complete in {folder}")
        return record
    _make(folder)
    check_disk(folder, found.need_bytes, settings, f"{len(found.jobs):,} shards")
    with _exclusive(folder / ".download.lock"):
        ds.write_manifest(folder, record)  # the split is known before the first byte
        results, failed = _run(found.jobs, found.partial_bytes, settings, stream, folder, record)
        _record(record, results)
        ds.write_manifest(folder, record)
    done = sum(1 for i in indices if (folder / shard_set.filename(i)).is_file())
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise DownloadError(f"{len(failed)} of {len(found.jobs)} files could not be fetched: {failed[0]}{more}; "
                            f"{done:,} of {len(indices):,} are complete in {folder}: rerun the same command to "
                            "resume")
    size = sum(r.size for r in results)
    files = f"{len(results):,} file" + ("s" if len(results) != 1 else "")
    say(f"done: {files} fetched and verified ({ds.format_bytes(size)}); all {done:,} complete in "
        f"{folder}; train with --data {folder}")
    return record


def _run(jobs: list[Job], partial: int, settings: Settings, stream, folder: Path,
         record: dict) -> tuple[list[Result], list[str]]:
    with Progress(jobs, partial, stream) as progress:
        try:
            return download_all(jobs, settings, progress)
        except KeyboardInterrupt:  # what finished is complete: say so in the manifest, keep the .part files
            record["files"].update({j.dest.name: {"bytes": j.dest.stat().st_size} for j in jobs if j.dest.is_file()})
            ds.write_manifest(folder, record)
            progress.note(f"interrupted: partial files kept in {folder}; rerun the same command to resume")
            raise


def _records(manifest: dict, found: Survey) -> dict:
    """The manifest's records, less those of files about to be fetched (moved aside or never finished)."""
    fetching = {job.dest.name for job in found.jobs}
    return {name: r for name, r in (manifest.get("files") or {}).items() if name not in fetching}


def _record(record: dict, results: list[Result]) -> None:
    for r in results:
        record["files"][r.job.dest.name] = {"bytes": r.size, "sha256": r.sha256, "checks": r.checks}


def _check_folder(folder: Path) -> None:
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot use --dir {folder}: {blocker} is a file, not a folder")


def _make(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --dir {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write in --dir {folder}")


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """One download at a time into a folder: two would write the same .part files."""
    try:
        with FileLock(str(lock), timeout=0):
            yield
    except Timeout:
        raise UsageError(f"another `onecard data download` is writing into {lock.parent}: wait for it, "
                         "or stop it first") from None


def _existing(path: Path) -> Path:
    """The folder itself or the nearest folder above it that exists: where free space is measured."""
    return next(p for p in (path, *path.parents) if p.is_dir())


# ---------------------------------------------------------------- chat and task datasets

def download_files(file_set: ds.FileSet, folder: Path, settings: Settings, base_url: str | None = None,
                   dry_run: bool = False, say: Say = print, stream=None) -> None:
    """Bring `folder` to hold every file of `file_set` under its repository path, each verified. A file
    already there counts when it passes the same check; one that does not is moved aside to NAME.damaged."""
    folder = Path(folder).expanduser()
    _check_folder(folder)
    check = partial(check_parquet, columns=file_set.columns)
    jobs, done = [], 0
    for path in file_set.files:
        dest = folder / path
        if dest.is_file() and _passes(dest, path, check, dry_run, say):
            done += 1
            continue
        jobs.append(Job(file_set.url(path, base_url), dest, file_set.approx_bytes / len(file_set.files), check,
                        label=path))
    say(f"{file_set.title}: {len(file_set.files)} files, {file_set.use}")
    say(f"source: {file_set.url(file_set.files[0], base_url)}, ...")
    estimate = sum(job.estimate for job in jobs)
    say(f"in {folder}: {done} complete, {len(jobs)} to fetch (roughly {ds.format_bytes(estimate)}: an estimate until "
        f"the server says); {ds.format_bytes(shutil.disk_usage(_existing(folder)).free)} free there")
    if dry_run or not jobs:
        say("dry run: nothing downloaded" if dry_run else f"nothing to do: all {done} files are complete in {folder}")
        return
    for job in jobs:
        _make(job.dest.parent)
    check_disk(folder, estimate, settings, f"{len(jobs)} files")
    with _exclusive(folder / ".download.lock"), Progress(jobs, 0, stream) as progress:
        results, failed = download_all(jobs, settings, progress)
    if failed:
        raise DownloadError(f"{len(failed)} of {len(jobs)} files could not be fetched: {failed[0]}; rerun the same "
                            "command to resume")
    size = sum(r.size for r in results)
    say(f"done: {len(results)} files fetched and verified ({ds.format_bytes(size)}); all {len(file_set.files)} "
        f"complete in {folder}")


def _passes(dest: Path, path: str, check: Callable[[Path], str], dry_run: bool, say: Say) -> bool:
    try:
        check(dest)
        return True
    except ValueError as e:
        say(f"damaged, {'would be ' if dry_run else ''}fetched again: {path} ({e})")
        if not dry_run:
            os.replace(dest, dest.with_name(dest.name + ".damaged"))
        return False


# ---------------------------------------------------------------- the CORE eval bundle

def check_zip(path: Path) -> str:
    """The eval bundle's zip reads and every member matches its CRC-32; ValueError (one line) otherwise."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, zlib.error) as e:
        raise ValueError(f"not a readable zip: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if bad is not None:
        raise ValueError(f"{bad} fails its CRC-32")
    if not any(Path(n).name == "core.yaml" for n in names):
        raise ValueError("no core.yaml in it: not the CORE eval bundle")
    return f"zip: {len(names)} members, CRC-32 of each checked"


def download_eval_bundle(folder: Path, settings: Settings, url: str | None = None, dry_run: bool = False,
                         say: Say = print, stream=None) -> None:
    """Fetch and verify eval_bundle.zip, then unpack it so that `folder` holds core.yaml, eval_data/ and
    eval_meta_data.csv (nanochat's layout). `folder` appears whole or not at all."""
    folder = Path(folder).expanduser()
    url = ds.EVAL_BUNDLE.url_at(url)  # --base-url: a mirror's folder, a pattern or the zip's own URL
    _check_folder(folder.parent)
    if (folder / "core.yaml").is_file():
        say(f"nothing to do: the eval bundle is complete in {folder}")
        return
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"--dir {folder} exists and is not an eval bundle: give a new folder")
    zip_path = folder.with_name(folder.name + ".zip")
    part, _ = part_paths(zip_path)
    have = part.stat().st_size if part.is_file() else 0
    say(f"CORE eval bundle: {url} (~{ds.format_bytes(ds.EVAL_BUNDLE.approx_bytes)}) into {folder}"
        + (f"; {ds.format_bytes(have)} already in {part.name}" if have else ""))
    if dry_run:
        say("dry run: nothing downloaded")
        return
    _make(folder.parent)
    if not zip_path.is_file():
        check_disk(folder.parent, 2 * ds.EVAL_BUNDLE.approx_bytes - have, settings, "the bundle and its unpacked copy")
        job = Job(url, zip_path, ds.EVAL_BUNDLE.approx_bytes, check_zip)
        with _exclusive(folder.with_name(f".{folder.name}.download.lock")), Progress([job], have, stream) as progress:
            _, failed = download_all([job], settings, progress)
        if failed:
            raise DownloadError(f"the eval bundle could not be fetched: {failed[0]}; rerun the same command to resume")
    _unpack(zip_path, folder)
    say(f"done: the eval bundle is in {folder} (verified: every member's CRC-32)")


def _unpack(zip_path: Path, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.unpacking-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
        inner = [p for p in tmp.iterdir()]
        top = inner[0] if len(inner) == 1 and inner[0].is_dir() else tmp  # the zip's own eval_bundle/ folder
        if folder.is_dir():
            folder.rmdir()  # empty, checked above
        os.replace(top, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
