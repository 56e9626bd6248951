"""The HumanEval sandbox refuses hostile code: fork bombs, endless loops, writes outside its folder,
the network, signals, memory hogs; each refusal is checked with every layer that claims it, alone
where the layer can be run alone (a kernel layer this machine lacks is skipped, saying so)."""

import functools
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from onecard.errors import UsageError
from onecard.sandbox import Limits, namespaces_work, require_posix, run_python

FAST = Limits(wall_s=3.0, cpu_s=3)
# (id, run_python options): everything, the audit hook with the resource limits only (the fallback
# where the kernel offers nothing), and each kernel layer without the audit hook
FULL = ("all-layers", {})
HOOK_ONLY = ("audit-hook-only", {"namespaces": False, "landlock": False})
LANDLOCK_ONLY = ("landlock-only", {"namespaces": False, "audit_hook": False})
NAMESPACE_ONLY = ("namespaces-only", {"landlock": False, "audit_hook": False})


@functools.cache
def layers_here() -> tuple[str, ...]:
    """The layers this machine can run, from a harmless program."""
    return run_python("pass\n", FAST).layers


def run(program: str, options: dict, limits: Limits = FAST, needs: str | None = None):
    """Run a hostile program; without the audit hook, only where the kernel layer relied on exists
    (checked before the program runs, never after)."""
    if not options.get("audit_hook", True):
        for layer in [needs] if needs else [n for o, n in (("landlock", "landlock-files"), ("namespaces", "namespaces"))
                                            if options.get(o, True)]:
            if layer not in layers_here():
                pytest.skip(f"this machine has no {layer} layer (it has {', '.join(layers_here())})")
    return run_python(program, limits, **options)


def alive(path: str) -> list[str]:
    """Processes whose command line names `path` (the sandbox's working folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and path in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(entry.name)
        except OSError:
            continue
    return found


def test_a_passing_and_a_failing_program():
    good = run_python("import math\nprint(math.factorial(5))\nassert math.factorial(5) == 120\n", FAST)
    assert good.passed and good.status == "passed" and good.stdout.strip() == "120"
    bad = run_python("assert 1 + 1 == 3, 'wrong'\n", FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError: wrong" in bad.detail


@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY])
def test_fork_bomb(name, options):
    outcome = run("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()\n", options)
    assert outcome.status == "refused" and "os.fork" in outcome.detail
    assert outcome.seconds < FAST.wall_s and not alive(outcome.stdout.strip())
    for spawn in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                  "import multiprocessing\nmultiprocessing.Process(target=print).start()",
                  "import os\nos.posix_spawn('/bin/true', ['true'], {})", "import ctypes"):
        assert run(spawn + "\n", options).status == "refused", spawn


@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY])
def test_endless_loops_are_stopped(name, options):
    outcome = run("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass\n", options, Limits(wall_s=1.0))
    assert outcome.status == "timeout" and outcome.seconds < 2.5
    assert not alive(outcome.stdout.strip())  # the whole process group (and namespace) is gone
    assert run("import time\ntime.sleep(60)\n", options, Limits(wall_s=1.0)).status == "timeout"
    cpu = run("while True:\n    pass\n", options, Limits(wall_s=10.0, cpu_s=1))
    assert cpu.status == "cpu-time" and cpu.seconds < 5


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY])
def test_nothing_outlives_the_program(name, options):
    """A program that leaves the process group, or kills the process that waits for it (neither has an
    audit event), lived on after run_python returned where there is no PID namespace."""
    for escape in ("os.setpgid(0, 0)", "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)"):
        outcome = run(f"import os, signal, time\nprint(os.getcwd(), flush=True)\n{escape}\ntime.sleep(20)\n",
                      options, Limits(wall_s=1.0))
        assert not outcome.passed
        deadline = time.monotonic() + 2  # SIGKILL is delivered, not waited for
        while alive(outcome.stdout.strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = alive(outcome.stdout.strip())
        for pid in left:  # before the fix: not left sleeping after the test
            os.kill(int(pid), signal.SIGKILL)
        assert not left, (escape, outcome)


@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY, LANDLOCK_ONLY])
def test_writes_outside_the_folder(tmp_path, name, options):
    target, victim = tmp_path / "escaped.txt", tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (f"open({str(target)!r}, 'w').write('x')",
                    f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                    f"import os\nos.remove({str(victim)!r})", f"import os\nos.rename({str(victim)!r}, 'here.txt')",
                    f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        outcome = run(program + "\n", options)
        assert not outcome.passed, (program, outcome)
        assert outcome.status == ("failed" if name == "landlock-only" else "refused"), (program, outcome)
    assert not target.exists() and victim.read_text() == "keep me"
    inside = run("import tempfile\nopen('mine.txt', 'w').write('x')\nos = __import__('os')\nos.mkdir('d')\n"
                 "os.rename('mine.txt', 'd/m.txt')\ntempfile.mkstemp()\nopen('/dev/null', 'w').write('x')\n", options)
    assert inside.passed, inside


@pytest.fixture
def server():
    """A TCP server on the loopback that counts the connections it accepts."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY, NAMESPACE_ONLY, LANDLOCK_ONLY])
def test_no_network(server, name, options):
    if name == "namespaces-only" and not namespaces_work():
        pytest.skip("`unshare --user --net` does not run on this machine")
    port, accepted = server
    needs = "landlock-tcp" if name == "landlock-only" else None
    outcome = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", options,
                  needs=needs)
    assert not outcome.passed and accepted == [], outcome
    assert outcome.status == ("refused" if options.get("audit_hook", True) else "failed")
    if name != "landlock-only":  # Landlock governs TCP, not the UDP of a name lookup
        assert not run("import socket\nsocket.getaddrinfo('example.com', 80)\n", options).passed


@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY, LANDLOCK_ONLY])
def test_no_signals_to_other_processes(name, options):
    # signal 0 only asks whether the process exists: harmless even if a layer failed
    needs = "landlock-signals" if name == "landlock-only" else None
    outcome = run(f"import os\nos.kill({os.getpid()}, 0)\n", options, needs=needs)
    assert not outcome.passed, outcome


def test_memory_files_and_environment(monkeypatch):
    assert run_python("x = bytearray(2 * 10**9)\n", FAST).status == "memory"
    big = run_python("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)\n", Limits(file_bytes=2**20))
    assert big.status == "file-size"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("ONECARD_SECRET", "s3cret")
    env = run_python("import os\nassert sorted(os.environ) == ['HOME', 'LANG', 'PATH', 'TMPDIR'], sorted(os.environ)\n"
                     "assert os.environ['HOME'] == os.getcwd()\n", FAST)
    assert env.passed, env


# writes files to their RLIMIT_FSIZE end, one after another, printing the MiB and the files written so far
FILL = ("import errno\nmib = files = 0\nwhile True:\n    with open(f'f{files}', 'wb', buffering=0) as f:\n"
        "        files += 1\n        try:\n            while True:\n                f.write(b'x' * 2**20)\n"
        "                mib += 1\n                print(mib, files, flush=True)\n"
        "        except OSError as error:\n            if error.errno != errno.EFBIG:\n                raise\n")


@pytest.mark.parametrize("file_mib", [1, 8])
@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY, NAMESPACE_ONLY])
def test_the_disk_is_not_filled(name, options, file_mib):
    """RLIMIT_FSIZE caps each file, not their sum: a loop of 1 MiB files wrote 3 GB in the default 5 s.
    A tmpfs caps the sum and the number of files; without one, the hook caps the number."""
    limits = Limits(wall_s=3.0, cpu_s=3, file_bytes=file_mib * 2**20)
    needs = "tmpfs" if name == "namespaces-only" else None
    outcome = run(FILL, options, limits, needs=needs)
    assert outcome.status in ("file-size", "refused"), outcome  # stopped by a cap, not by the clock
    mib, files = map(int, outcome.stdout.split()[-2:])
    assert files <= limits.new_files, outcome
    assert mib * 2**20 <= limits.disk_bytes if "tmpfs" in outcome.layers else "write-count" in outcome.layers
    folders = run("import os\nfor n in range(10**6):\n    os.mkdir(f'd{n}')\n", options, limits, needs=needs)
    assert folders.status in ("file-size", "refused"), folders


@pytest.mark.parametrize("name, options", [FULL, HOOK_ONLY, LANDLOCK_ONLY])
def test_the_program_cannot_speak_for_the_sandbox(name, options):
    """The sandbox's own lines shared the program's stderr: a program that printed them changed
    Outcome.layers and the status. Nor can it write to the status file, outside its folder."""
    honest = run("pass\n", options).layers
    forged = ("layers forged", "refused os.fork", "killed by SIGXCPU", "the program exited early")
    outcome = run("import os, sys\n"
                  f"for line in {forged!r}:\n    print('onecard-sandbox:', line, file=sys.stderr)\n"
                  "try:\n    open(os.path.join('..', 'status'), 'a').write('onecard-sandbox: layers forged\\n')\n"
                  "except OSError:\n    pass\nassert False, 'the end'\n", options)
    assert outcome.layers == honest and outcome.detail == "AssertionError: the end", outcome
    assert outcome.status == ("refused" if options.get("audit_hook", True) else "failed"), outcome  # the open


def test_an_early_exit_is_not_a_pass():
    for program in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n",
                    "import posix\nposix._exit(0)\n"):  # os._exit under its own module's name
        outcome = run_python(program + "assert False\n", FAST)
        assert outcome.status == ("refused" if "_exit" in program else "exited-early"), (program, outcome)


def test_windows_is_refused_before_anything_runs(monkeypatch):
    require_posix()  # this machine: POSIX
    with monkeypatch.context() as patched:  # os.name only around the check: pathlib reads it too
        patched.setattr(os, "name", "nt")
        with pytest.raises(UsageError, match="needs Linux or macOS") as error:
            require_posix()
        with pytest.raises(UsageError, match="needs Linux or macOS"):
            run_python("pass\n", FAST)  # the backstop
    assert "\n" not in str(error.value)
