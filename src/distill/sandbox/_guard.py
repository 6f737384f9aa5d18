"""Second layer: an audit hook in the program's own (fresh) interpreter, then the program as ``__main__``.

Run as ``python -I -S -B _guard.py program.py audit|- MAX_PROCESSES`` by the launcher, after the kernel layers
are in place. The hook turns the common cases (writing outside the run's folder, sockets, ``ctypes``,
signals to other processes, starting programs) into a clear ``PermissionError`` naming the sandbox, so
model-written code fails with a readable message. It is not the boundary: code in the same interpreter can
reach the hook's state (e.g. through ``gc``), and everything it refuses the kernel refuses too.
"""

import builtins
import os
import sys

# Audit events by what the hook checks about them. Plain sets, not frozensets: the hook is not the boundary, and
# tests/test_sandbox_escapes.py empties them (through gc) to show that the kernel layers hold without it.
PATH_EVENTS = {
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.lchown",
    "os.lchmod",
    "os.utime",
    "os.chflags",
    "os.lchflags",
    "os.setxattr",
    "os.removexattr",
    "shutil.rmtree",
    "os.mkfifo",
    "os.mknod",
    "sqlite3.connect",
}
TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink", "shutil.move"}
NETWORK_EVENTS = {
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
    "socket.sendto",
    "socket.sendmsg",
}
EXEC_EVENTS = {"os.exec", "os.posix_spawn", "os.system", "subprocess.Popen", "os.spawn", "pty.spawn"}
SIGNAL_EVENTS = {"os.kill", "os.killpg", "signal.pthread_kill", "signal.pidfd_send_signal"}
REFUSED_IMPORTS = {"ctypes", "_ctypes", "cffi"}


def install(workdir, fork_budget, allow_exec):
    """Add the audit hook: writes only under ``workdir``, at most ``fork_budget`` forks, programs only if allowed.

    The hook is one function with its tables bound as locals, not split into per-event helpers: it runs on every
    audited event of the program (each ``open``, ``import``...), so it stays one closure with no calls of its own.
    """
    realpath, getpid, isinstance_, str_, bytes_ = os.path.realpath, os.getpid, isinstance, str, bytes
    root = realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    budget = [fork_budget]

    def inside(path):
        if isinstance_(path, int):
            return True  # an already open descriptor
        if isinstance_(path, bytes_):
            path = path.decode("utf-8", "surrogateescape")
        full = realpath(path)
        return full == root or full.startswith(root + "/") or full == "/dev/null"

    # The event tables as locals: the hook runs on every audited event, and closure cells are read faster than
    # module globals.
    path_events, two_path_events, network_events = PATH_EVENTS, TWO_PATH_EVENTS, NETWORK_EVENTS
    exec_events, signal_events, refused_imports = EXEC_EVENTS, SIGNAL_EVENTS, REFUSED_IMPORTS

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
                isinstance_(flags, int) and flags & write_flags
            )
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is refused: {path!r}")
        elif event in path_events:
            if args and not inside(args[0]):
                raise PermissionError(f"sandbox: {event} outside the working directory is refused: {args[0]!r}")
        elif event in two_path_events:
            if not (inside(args[0]) and inside(args[1])):
                raise PermissionError(f"sandbox: {event} outside the working directory is refused")
        elif event in network_events:
            if event == "socket.__new__" and args[1] == 1:
                return  # AF_UNIX: socketpair() (asyncio's self-pipe); seccomp refuses a plain unix socket
            raise PermissionError(f"sandbox: network access is refused ({event})")
        elif event in ("os.fork", "os.forkpty"):
            if budget[0] <= 0:
                raise PermissionError("sandbox: process limit reached (fork refused)")
            budget[0] -= 1
        elif event in exec_events:
            if not allow_exec:
                raise PermissionError(f"sandbox: starting programs is refused ({event})")
        elif event in signal_events:
            if event == "signal.pidfd_send_signal" or args[0] not in (0, getpid()):
                raise PermissionError(f"sandbox: signalling other processes is refused ({event})")
        elif event == "import" and args[0] in refused_imports:
            raise PermissionError(f"sandbox: importing {args[0]} is refused")

    def after_fork_in_child():
        budget[0] = 0  # only the first process may fork, so the total stays bounded

    os.register_at_fork(after_in_child=after_fork_in_child)
    sys.addaudithook(hook)


def main():
    program, audit, max_processes = sys.argv[1], sys.argv[2] == "audit", int(sys.argv[3])
    # `-S` skips `site` (faster start, no site-packages); keep its exit() / quit(), which model code calls.
    import _sitebuiltins

    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    with open(program, encoding="utf-8") as f:
        source = f.read()
    if audit:
        install(os.getcwd(), max_processes - 1, max_processes > 1)
    sys.argv = [program]
    code = compile(source, "program.py", "exec")
    # The program gets a __main__ module of its own (pickle and friends look functions up there).
    module = type(sys)("__main__")
    module.__builtins__, module.__file__ = builtins, program
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


if __name__ == "__main__":
    main()
