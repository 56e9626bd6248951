"""Running code a model wrote (HumanEval) in a separate, confined process — never in onecard's own.

Each program runs in `python -I -B onecard/sandbox_runner.py` (isolated mode: no PYTHON* variables,
no user site-packages, no bytecode written) with a fresh temporary working directory and an
environment of PATH, LANG, HOME and TMPDIR only (no proxies, no credentials). What is enforced, in
layers; a test checks every refusal (tests/test_sandbox.py):

  time      a wall-clock limit (the parent kills the whole process group, and with it the PID
            namespace) and RLIMIT_CPU
  memory    RLIMIT_AS; RLIMIT_NOFILE; no core dumps
  disk      each file at most RLIMIT_FSIZE; all together, a tmpfs of disk_bytes and new_files files
            mounted over the working directory in a new mount namespace where `unshare` works;
            elsewhere the audit hook allows new_files opens for writing (and mkdir, symlink, link),
            which bounds the total to new_files × file_bytes
  processes fork, exec, spawn, system, subprocess and multiprocessing are refused by an audit hook
            (and ctypes, which could call fork directly, cannot be imported); RLIMIT_NPROC = 1
            where the kernel enforces it (not for root); a PID namespace where `unshare` works, so
            that nothing outlives the program; on Linux, the program is killed when the process
            that waits for it ends (a program that leaves the process group or kills that process)
  files     writes, removals, renames and links outside the working directory are refused by the
            audit hook and, where the kernel has Landlock (Linux 5.13+), by the kernel
  network   a new network namespace (no interfaces but a down loopback) where `unshare --user
            --net` works; the audit hook refuses socket creation, connect, bind and lookups; from
            Landlock ABI 4 the kernel refuses TCP bind and connect
  signals   os.kill and friends refused by the audit hook; from Landlock ABI 6 by the kernel

An audit hook is not a security boundary against code written to escape it (CPython says so);
the kernel layers are. Where neither namespaces nor Landlock are available (macOS, some
containers), only the hook and the resource limits stand: Outcome.layers says which ran. The
sandbox's own word (the layers, a refusal, a kill) comes in a status file outside the working
directory that only stage 1 writes, never in the program's stderr, which it could fill with lookalikes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from onecard.errors import UsageError

RUNNER = Path(__file__).with_name("sandbox_runner.py")
NAMESPACES = ["unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork", "--kill-child"]


@dataclass(frozen=True)
class Limits:
    wall_s: float = 5.0  # nanochat's HumanEval timeout
    cpu_s: int = 5
    memory_bytes: int = 256 * 2**20  # nanochat's HumanEval memory cap
    file_bytes: int = 16 * 2**20  # each file
    disk_bytes: int = 64 * 2**20  # all files together, where there is a tmpfs
    new_files: int = 16  # files and folders created; without a tmpfs, opens for writing
    open_files: int = 64


@dataclass
class Outcome:
    passed: bool
    status: str  # passed | failed | refused | timeout | cpu-time | memory | file-size (or disk full) | exited-early
    detail: str  # the last line of what went wrong, or ""
    seconds: float
    layers: tuple[str, ...]  # the confinement that ran: namespaces, rlimits, tmpfs, landlock-*, write-count, audit-hook
    stdout: str = ""  # the last 2 kB the program printed


@functools.cache
def namespaces_work() -> bool:
    """Whether `unshare --user --mount --net --pid` runs here (a kernel and a policy that allow user namespaces)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run([*NAMESPACES, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def require_posix() -> None:
    """UsageError where the sandbox cannot run: checked before a model writes 164 programs for nothing."""
    if os.name != "posix":
        raise UsageError("running model-written code (HumanEval) needs Linux or macOS: its sandbox uses POSIX "
                         "resource limits and process groups")


def run_python(program: str, limits: Limits = Limits(), namespaces: bool = True, landlock: bool = True,
               audit_hook: bool = True) -> Outcome:
    """Run `program` confined; passed means it ran to its end and exited 0 within the limits.
    namespaces, landlock and audit_hook turn single layers off, for tests that prove each alone."""
    require_posix()  # a backstop: `onecard eval` checks before the model loads
    box = Path(tempfile.mkdtemp(prefix="onecard-sandbox-"))
    try:
        work = box / "work"
        work.mkdir()
        (work / "program.py").write_text(program, encoding="utf-8")
        namespaced = namespaces and namespaces_work()
        (box / "status").touch()  # what the sandbox says, written by stage 1, where the program cannot write
        config = {**asdict(limits), "landlock": landlock, "audit_hook": audit_hook, "tmpfs": namespaced,
                  "status": str(box / "status")}
        command = [sys.executable, "-I", "-B", str(RUNNER), str(work), json.dumps(config)]
        if namespaced:
            command = NAMESPACES + command
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        # output goes to files outside the working directory: RLIMIT_FSIZE bounds them, the program
        # cannot rewrite them, and the parent never holds more than their tail in memory
        with open(box / "stdout", "wb") as out, open(box / "stderr", "wb") as err:
            started = time.monotonic()
            code = _wait(subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=err, start_new_session=True), limits.wall_s)
            seconds = time.monotonic() - started
        outcome = _outcome(code, _tail(box / "stderr"), _tail(box / "status"), seconds, namespaced, audit_hook)
        outcome.stdout = "\n".join(_tail(box / "stdout", 2048))
        return outcome
    finally:
        shutil.rmtree(box, ignore_errors=True)


def _wait(process: subprocess.Popen, wall_s: float) -> int | None:
    """The exit code, or None after killing the process group at the wall-clock limit."""
    try:
        return process.wait(timeout=wall_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        return None


def _tail(path: Path, size: int = 8192) -> list[str]:
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - size))
        return file.read().decode("utf-8", errors="replace").splitlines()


def _outcome(code: int | None, lines: list[str], sandbox: list[str], seconds: float, namespaced: bool,
             hooked: bool) -> Outcome:
    """lines: the program's stderr, which it may fill with anything; sandbox: the status file,
    written only by stage 1 (the layers, then how the program ended, if it did not end well)."""
    layers = ["namespaces"] if namespaced else []
    for line in sandbox:
        if line.startswith("onecard-sandbox: layers "):
            layers += line.split(" ", 2)[2].split(",")
    layers += ["audit-hook"] if hooked else []
    said = [line.strip() for line in lines if line.strip()]
    ending = next((line for line in sandbox if not line.startswith("onecard-sandbox: layers ")), "")
    last = said[-1] if said and "killed by" not in ending else ending
    if code == 0:
        status = "passed"
    elif code is None:
        status, last = "timeout", f"still running at the wall-clock limit ({seconds:.1f} s)"
    elif "SIGXCPU" in ending:
        status = "cpu-time"
    elif "SIGXFSZ" in ending or "File too large" in last or "No space left on device" in last:
        status = "file-size"
    elif "refused" in ending:
        status = "refused"
    elif any("MemoryError" in line for line in said):
        status = "memory"
    elif "exited early" in ending:
        status = "exited-early"
    else:
        status = "failed"
    return Outcome(status == "passed", status, last[:300], seconds, tuple(layers))
