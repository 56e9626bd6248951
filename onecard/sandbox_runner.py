"""The sandbox's child process (see onecard/sandbox.py): never imported by onecard, run as a script.

    python -I -B sandbox_runner.py SCRATCH CONFIG_JSON

Stage 1 (this file, started by the parent) forks once and waits: it is the namespace's first
process where there is a PID namespace, so that when it ends the kernel ends everything inside.
The forked child mounts a size-limited tmpfs over SCRATCH where it has a mount namespace of its
own, lowers its resource limits, restricts itself with Landlock where the kernel has it, and then
execs stage 2 (this file again, with --run), a fresh interpreter that has never loaded ctypes.
Stage 2 installs an audit hook and runs SCRATCH/program.py. Limits, Landlock, the mount and
no_new_privs hold across exec; the audit hook cannot be removed from Python code.

What the sandbox itself says (the layers, how the program ended) goes to the status file named in
CONFIG_JSON, outside SCRATCH, which the program cannot write to (the hook and Landlock refuse it);
its stderr is its own. Stage 2 tells stage 1 how the program ended by its exit status alone.

Only the standard library is used here.
"""

import json
import os
import posix
import resource
import signal
import sys

REFUSED = "onecard-sandbox: refused"
# stage 2's exit statuses for a program that was refused something or exited early (no other way
# out of stage 2 gives them), and the status lines stage 1 writes for them
EXIT_REFUSED, EXIT_EARLY = 3, 4
ENDINGS = {EXIT_REFUSED: REFUSED, EXIT_EARLY: "onecard-sandbox: the program exited early"}
# Audit events that start processes, signal other processes, reach the network, load native code
# or raise limits: refused outright.
BLOCKED = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.setuid", "os.chroot",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "http.client.connect", "urllib.Request", "ftplib.connect",
    "smtplib.connect", "webbrowser.open", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "resource.setrlimit", "resource.prlimit", "sqlite3.connect",
}
# Native modules that could do the above without an audit event.
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "_multiprocessing"}
# Events that change the file system, and which of their arguments are paths that must lie in SCRATCH.
WRITES = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.symlink": (1,),
    "os.link": (0, 1), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
    "shutil.copytree": (1,), "shutil.move": (1,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Events that create a file or folder: counted, with opens for writing, where there is no tmpfs.
CREATES = {"os.mkdir", "os.symlink", "os.link"}

# Landlock (Linux 5.13+): syscall numbers are the same on every architecture onecard runs on.
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
MS_NOSUID, MS_NODEV = 2, 4


def set_limits(config: dict) -> None:
    memory, cpu = config["memory_bytes"], config["cpu_s"]
    for name, value in (("RLIMIT_AS", (memory, memory)), ("RLIMIT_CPU", (cpu, cpu + 1)),
                        ("RLIMIT_FSIZE", (config["file_bytes"],) * 2), ("RLIMIT_NOFILE", (config["open_files"],) * 2),
                        ("RLIMIT_CORE", (0, 0)), ("RLIMIT_NPROC", (1, 1))):
        try:
            resource.setrlimit(getattr(resource, name), value)
        except (ValueError, OSError):  # above the hard limit already set: keep the lower one
            pass


def mount_tmpfs(scratch: str, config: dict) -> bool:
    """A tmpfs over SCRATCH holding only program.py, in the mount namespace `unshare --mount` made:
    RLIMIT_FSIZE caps each file, this caps their sum (size) and their number (nr_inodes, which size
    does not count), and it goes with the namespace. Returns whether it was mounted."""
    import ctypes

    path = os.path.join(scratch, "program.py")
    with open(path, "rb") as file:
        program = file.read()
    options = f"size={config['disk_bytes']},nr_inodes={config['new_files'] + 2},mode=700"  # + the root, program.py
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", os.fsencode(scratch), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
        return False
    with open(path, "wb") as file:
        file.write(program)
    return True


def landlock(scratch: str) -> list[str]:
    """Writes only beneath SCRATCH (and to /dev/null); from ABI 4 no TCP bind or connect; from ABI 6
    no signals to, nor abstract sockets of, processes outside. Returns what was applied."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return []
    write = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write file, remove, make *
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    net = 0b11 if abi >= 4 else 0  # bind TCP, connect TCP: handled, and no rule allows them
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = Ruleset(write, net, scoped)
    fd = libc.syscall(CREATE_RULESET, ctypes.byref(ruleset), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return []
    for path, allowed in ((scratch, write), ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0))):
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(allowed, target)
        libc.syscall(ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(target)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(RESTRICT_SELF, ctypes.c_int(fd),
                                                                          ctypes.c_uint32(0)) != 0:
        return []
    os.close(fd)
    return ["landlock-files"] + (["landlock-tcp"] if net else []) + (["landlock-signals"] if scoped else [])


def die_with(parent: int) -> None:
    """Linux: the kernel kills this process when stage 1 ends. The wall-clock kill reaches the
    process group and a PID namespace's members, but a program can leave the group (os.setpgid) or
    kill stage 1 (signal.pidfd_send_signal), with no audit event, and live on where there is no
    namespace; this signal holds across exec and reaches it either way."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # stage 1 ended before the signal was asked for
        os._exit(1)


def stage1(scratch: str, config: dict) -> None:
    status_file = open(config["status"], "a")  # not inherited by stage 2: closed at exec
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        if sys.platform == "linux":
            die_with(parent)
        mounted = config["tmpfs"] and mount_tmpfs(scratch, config)
        os.chdir(scratch)  # after the mount: the tmpfs, not the folder beneath it
        layers = ["rlimits"] + (["tmpfs"] if mounted else [])
        set_limits(config)
        if config["landlock"] and sys.platform == "linux":
            try:
                layers += landlock(scratch)
            except (OSError, AttributeError):
                pass
        counted = None if mounted else config["new_files"]  # without a tmpfs the hook counts what is written
        layers += ["write-count"] if config["audit_hook"] and counted is not None else []
        status_file.write(f"onecard-sandbox: layers {','.join(layers)}\n")
        status_file.flush()
        hook = "--run" if config["audit_hook"] else "--run-unhooked"  # the latter: tests of the kernel layers
        os.execv(sys.executable, [sys.executable, "-I", "-B", __file__, hook, scratch, json.dumps(counted)])
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        status_file.write(f"onecard-sandbox: killed by {signal.Signals(number).name}\n")
        status_file.flush()
        os._exit(128 + number)
    code = os.WEXITSTATUS(status)
    if code in ENDINGS:
        status_file.write(ENDINGS[code] + "\n")
        status_file.flush()
    os._exit(code)


def inside(path: object, scratch: str) -> bool:
    if isinstance(path, int):  # an open descriptor: opened under these rules
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == scratch or real.startswith(scratch + os.sep) or real == "/dev/null"


REFUSALS: list[str] = []  # every refusal, also those the program caught


def refuse(event: str, what: str = "") -> None:
    REFUSALS.append(event)
    raise PermissionError(f"{REFUSED} {event}{' ' + what if what else ''}")


def guard(scratch: str, new_files: int | None):
    """The audit hook; where new_files is not None, it allows that many opens for writing and
    creations (CREATES) in all, so that what is written stays under new_files × RLIMIT_FSIZE."""
    left = new_files

    def create(event: str) -> None:
        nonlocal left
        if left is not None:
            if left == 0:
                refuse(event, f"beyond {new_files} files written")
            left -= 1

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED:
            refuse(event)
        elif event == "import" and args and args[0] in BLOCKED_IMPORTS:
            refuse(event, args[0])
        elif event == "open" and len(args) >= 3:
            flags, mode = args[2], args[1]
            writes = (isinstance(flags, int) and flags & WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes and args[0] is not None and not inside(args[0], scratch):
                refuse("open", f"{os.fsdecode(args[0])!r} for writing")
            if writes:
                create(event)
        elif event in WRITES:
            for i in WRITES[event]:
                if i < len(args) and args[i] is not None and not inside(args[i], scratch):
                    refuse(event, repr(os.fsdecode(args[i])))
            if event in CREATES:
                create(event)
    return hook


def stage2(scratch: str, hooked: bool, new_files: int | None) -> None:
    with open(os.path.join(scratch, "program.py"), encoding="utf-8") as file:
        source = file.read()
    code = compile(source, "program.py", "exec")
    if hooked:
        sys.addaudithook(guard(scratch, new_files))
        # a program that exits early has not passed its tests; os._exit is posix._exit, under both names
        os._exit = posix._exit = lambda *_: refuse("os._exit")
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit:
        sys.exit(EXIT_REFUSED if REFUSALS else EXIT_EARLY)
    except BaseException as error:
        if not REFUSALS:
            raise
        sys.excepthook(type(error), error, error.__traceback__)
        sys.exit(EXIT_REFUSED)


if __name__ == "__main__":
    if sys.argv[1] in ("--run", "--run-unhooked"):
        stage2(os.path.realpath(sys.argv[2]), sys.argv[1] == "--run", json.loads(sys.argv[3]))
    else:
        stage1(os.path.realpath(sys.argv[1]), json.loads(sys.argv[2]))
