"""Set up the kernel boundary for one sandboxed run, then exec the untrusted program in a fresh interpreter.

Run as ``python -I -S -B _launcher.py config.marshal`` (the parent runs its compiled code, the same thing).
It is a standalone program, stdlib only, so the parent needs no ``preexec_fn``, which is unsafe in a
threaded parent. Process tree, pids as the host sees them:

    launcher (A) -- unshares user/pid/net/ipc/mount/uts namespaces, writes the uid/gid maps
      `- init (C) -- pid 1 of the new pid namespace: mounts a fresh /proc and a tmpfs on the run's folder,
           |         reaps orphans; when the program exits, C exits and the kernel kills everything left
           |         in the namespace (setsid or not)
           `- program (D) -- rlimits, Landlock, no_new_privs, seccomp, then execve() of a fresh interpreter
                              running the audit guard and the program: no handle of this file survives

As host root, A first drops to uid/gid 65534 (after making the interpreter reachable through a private
mount namespace), so the program is not root outside its namespace: RLIMIT_NPROC then applies (the kernel
exempts uid 0 even inside a user namespace) and file permissions are a second wall behind Landlock.

Protocol with the parent (``distill.sandbox.run``): D writes one line (a Python literal) to the status descriptor
(``layers``, ``limits``, and ``refused``: required layers that could not be set, in which case the program
is not run and the exit status is 125); C writes ``{"returncode": n}`` when the program ends. A setup
error is reported as ``{"error": message}`` with exit status 126.
"""

# Only fast imports: this runs once per sandboxed program (json or signal would cost ~5 ms each, in enum/re).
import ctypes
import marshal
import os
import resource
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
CLONE_THREAD = 0x00010000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22
SANDBOX_UID = 1000  # the program's uid and gid inside its user namespace (not 0: no capabilities after exec)
NOBODY = 65534  # what host root drops to
SIGKILL = 9

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on x86_64 and aarch64.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
MOUNT_ATTR_RDONLY, AT_RECURSIVE = 0x1, 0x8000
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
FILE_ACCESS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # rights a file rule may hold
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
ACCESS = {
    "r": FS_READ_FILE | FS_READ_DIR,
    "rx": FS_READ_FILE | FS_READ_DIR | FS_EXECUTE,
    "rw": FS_READ_FILE | FS_WRITE_FILE,
}

# Seccomp: syscalls refused with EPERM (debugging other processes, new namespaces, kernel keyrings, bpf,
# io_uring, which has bypassed LSM checks before, mounts, modules), per architecture.
SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# fmt: off
DENIED_SYSCALLS = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_open": 434, "pidfd_getfd": 438,
        "pidfd_send_signal": 424, "unshare": 272, "setns": 308, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "kexec_load": 246, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "personality": 135, "inotify_init": 253, "inotify_add_watch": 254, "inotify_init1": 294,
        "fanotify_init": 300, "fanotify_mark": 301,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_open": 434, "pidfd_getfd": 438,
        "pidfd_send_signal": 424, "unshare": 97, "setns": 268, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "kexec_load": 104, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "personality": 92, "inotify_init1": 26, "inotify_add_watch": 27, "fanotify_init": 262, "fanotify_mark": 263,
    },
}
# fmt: on
PROCESS_SYSCALLS = {
    "x86_64": {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "socket": 41, "socketpair": 53},
    "aarch64": {"clone": 220, "clone3": 435, "socket": 198, "socketpair": 199},
}
# Socket families a program may create: IP (useless in the empty network namespace; Landlock refuses TCP) and
# unix socketpairs (asyncio's self-pipe). No AF_UNIX socket() (it could connect to a host daemon's socket
# file: Landlock does not govern that), no AF_VSOCK (the VM's host), AF_NETLINK, AF_PACKET, AF_ALG, ...
SOCKET_FAMILIES = {"socket": (2, 10), "socketpair": (1,)}  # AF_INET, AF_INET6; AF_UNIX
THREADS = 64  # threads (tasks) a program with max_processes=1 may have; RLIMIT_NPROC counts threads too

NOTES = {}  # why a layer is absent, for `distill doctor`
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A layer that should have worked did not; the message says which and why."""


def check(result, what):
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def write_status(fd, record):
    """One line, a Python literal (the parent reads it with ``ast.literal_eval``)."""
    os.write(fd, (repr(record) + "\n").encode())


def error_text():
    import traceback

    return traceback.format_exc()


# ---- host root: become nobody, with the interpreter still reachable ------------------------------------------------


def blocked_ancestor(path):
    """The topmost folder strictly above ``path`` that others may not traverse, or None."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        folder = "/" + "/".join(parts[:depth])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def make_reachable(paths):
    """Mount a tmpfs over every folder nobody cannot traverse and bind back just ``paths`` under it.

    Runs in a private mount namespace of host root; ``open_tree`` keeps a detached copy of each path while
    its parent is covered. Paths keep their names, so absolute RUNPATHs in the interpreter still resolve.
    """
    kept = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    groups = {}
    for path in kept:
        top = blocked_ancestor(path)
        if top is not None:
            groups.setdefault(top, []).append(path)
    for top, inner in groups.items():
        trees = []
        for path in inner:  # OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
            tree = check(libc.syscall(SYS_OPEN_TREE, -100, path.encode(), 1 | 0o2000000 | 0x8000), f"open_tree {path}")
            trees.append((path, os.path.isdir(path), tree))
        check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"), f"tmpfs on {top}")
        for path, is_dir, tree in trees:
            os.makedirs(path if is_dir else os.path.dirname(path), mode=0o755, exist_ok=True)
            if not is_dir:
                open(path, "a").close()
            # MOVE_MOUNT_F_EMPTY_PATH: the source is the detached tree itself.
            check(libc.syscall(SYS_MOVE_MOUNT, tree, b"", -100, path.encode(), 4), f"move_mount {path}")
            os.close(tree)


def drop_root(cfg):
    """As host root: private mount namespace, interpreter reachable, run folder owned by nobody, then setuid."""
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    make_reachable([path for path, _ in cfg["read_paths"]] + [cfg["root"]])
    for path in (cfg["root"], cfg["work"], cfg["program"], cfg["guard"]):
        os.chown(path, NOBODY, NOBODY)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    # A uid change clears "dumpable", which makes /proc/self/uid_map root's; this process must write it.
    check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


# ---- namespaces ----------------------------------------------------------------------------------------------------


def enter_namespaces(cfg, layers):
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWCGROUP
    if cfg["isolate_network"]:
        flags |= CLONE_NEWNET
    check(libc.unshare(flags), "unshare(CLONE_NEWUSER | CLONE_NEWPID | ...)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{SANDBOX_UID} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{SANDBOX_UID} {gid} 1")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    layers += ["userns", "pidns", "ipcns", "mntns", "utsns"] + (["netns"] if cfg["isolate_network"] else [])


def set_readonly(path, readonly, recursive):
    """mount_setattr(2): set or clear MOUNT_ATTR_RDONLY on the mount at ``path`` (and below)."""
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    return libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), flags, attr, len(attr)) == 0


def init_mounts(cfg, layers):
    """In pid 1 of the new namespace: every existing mount read-only (Landlock does not govern chmod, chown,
    utime or xattrs; a read-only mount refuses them all), a /proc that shows only this namespace, and a
    size-capped tmpfs as the run's folder, the one writable place."""
    if set_readonly("/", True, recursive=True):
        layers.append("ro-root")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, None) == 0:
        layers.append("proc")
    elif libc.mount(b"tmpfs", b"/proc", b"tmpfs", flags, b"size=4k,mode=0555") == 0:
        layers.append("proc-hidden")
    options = f"size={cfg['tmpfs_bytes']},nr_inodes=4096,mode=0700".encode()
    if libc.mount(b"tmpfs", cfg["work"].encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) == 0:
        layers.append("tmpfs")
    elif "ro-root" in layers:  # the run's folder on the host disk, writable again on its own bind mount
        work = cfg["work"].encode()
        check(libc.mount(work, work, None, 0x1000, None), "bind mount of the run folder")  # MS_BIND
        if not set_readonly(cfg["work"], False, recursive=False):
            raise SetupError("could not make the run's folder writable")


# ---- the program's own restrictions --------------------------------------------------------------------------------


def set_rlimits(cfg, layers, limits, counted):
    values = [
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_CPU, cfg["cpu_s"]),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
        (resource.RLIMIT_NOFILE, cfg["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in values:
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))
    layers.append("rlimits")
    limits.update(
        memory_bytes=resource.getrlimit(resource.RLIMIT_AS)[0],
        cpu_s=resource.getrlimit(resource.RLIMIT_CPU)[0],
        file_bytes=resource.getrlimit(resource.RLIMIT_FSIZE)[0],
        open_files=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )
    # RLIMIT_NPROC counts this user's tasks (processes and threads) in this user namespace: the launcher and
    # init are two of them. The kernel ignores it for host uid 0, so it is only a layer once root has been
    # dropped. With max_processes=1 seccomp refuses new processes, and the limit leaves room for threads.
    if counted:
        tasks = THREADS if cfg["max_processes"] == 1 else cfg["max_processes"]
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks + 2,) * 2)
        layers.append("nproc")
        limits["tasks"] = resource.getrlimit(resource.RLIMIT_NPROC)[0] - 2
        if cfg["max_processes"] > 1:
            limits["processes"] = limits["tasks"]


def landlock(cfg, layers):
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)
    if abi < 1:
        return 0
    fs_mask = (1 << 13) - 1  # ABI 1: execute .. make_sym
    fs_mask |= (1 << 13) if abi >= 2 else 0  # REFER: rename/link across folders
    fs_mask |= FS_TRUNCATE if abi >= 3 else 0
    fs_mask |= FS_IOCTL_DEV if abi >= 5 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 and cfg["isolate_network"] else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = struct.pack("QQQ", fs_mask, net, scoped)[:size]
    ruleset = check(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, size, 0), "landlock_create_ruleset")
    rules = [(path, ACCESS[kind]) for path, kind in cfg["read_paths"]] + [(cfg["work"], fs_mask)]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        if not os.path.isdir(path):
            access &= FILE_ACCESS
        rule = struct.pack("=Qi", access & fs_mask, fd)
        check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
        os.close(fd)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    layers.append("no_new_privs")
    check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    # Before ABI 3 truncate() is not governed; read-only host mounts ("ro-root") refuse it outside the run's
    # folder anyway. Without them an older ABI is a weaker layer, named so.
    layers += ["landlock-fs" if abi >= 3 or "ro-root" in layers else f"landlock-fs-v{abi}"]
    layers += (["landlock-net"] if net else []) + (["landlock-scope"] if scoped else [])
    return abi


def bpf(code, k=0, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp(cfg, layers, limits):
    """A filter refusing DENIED_SYSCALLS, new namespaces, and new processes when only one is allowed."""
    arch = os.uname().machine
    if arch not in SECCOMP_ARCH:
        return
    ld_word, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
    eperm, eagain, enosys = errno | 1, errno | 11, errno | 38
    no_fork = cfg["max_processes"] == 1
    procs = PROCESS_SYSCALLS[arch]
    prog = [bpf(ld_word, 4), bpf(jeq, SECCOMP_ARCH[arch], 1, 0), bpf(ret, kill), bpf(ld_word, 0)]
    if arch == "x86_64":  # x32 syscall numbers (bit 30) would go around the table
        prog += [bpf(jge, 0x40000000, 0, 1), bpf(ret, kill)]
    for nr in DENIED_SYSCALLS[arch].values():
        prog += [bpf(jeq, nr, 0, 1), bpf(ret, eperm)]
    for name, families in SOCKET_FAMILIES.items():
        block = [bpf(ld_word, 16)]  # args[0]: the family
        block += [bpf(jeq, family, len(families) - index, 0) for index, family in enumerate(families)]
        block += [bpf(ret, errno | 97), bpf(ret, allow)]  # EAFNOSUPPORT
        prog += [bpf(jeq, procs[name], 0, len(block))] + block
    # clone3 passes its flags in memory, which a filter cannot read: ENOSYS makes libc fall back to clone.
    prog += [bpf(jeq, procs["clone3"], 0, 1), bpf(ret, enosys)]
    for name in ("fork", "vfork"):
        if name in procs:
            prog += [bpf(jeq, procs[name], 0, 1), bpf(ret, eagain if no_fork else allow)]
    namespaces = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    namespaces |= CLONE_NEWCGROUP
    clone_block = [bpf(ld_word, 16), bpf(jset, namespaces, 0, 1), bpf(ret, eperm)]
    if no_fork:  # threads (CLONE_THREAD) only
        clone_block += [bpf(jset, CLONE_THREAD, 1, 0), bpf(ret, eagain)]
    clone_block += [bpf(ret, allow)]
    prog += [bpf(jeq, procs["clone"], 0, len(clone_block))] + clone_block + [bpf(ret, allow)]
    program = b"".join(prog)
    filters = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(filters))
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")
    layers.append("seccomp")
    if no_fork:
        limits["processes"] = 1


def confine_and_exec(cfg, layers, counted, status_fd):
    """In the program's process: every restriction, the status line, then exec (or refuse)."""
    limits = {"processes": None, "tasks": None}
    os.chdir(cfg["work"])
    set_rlimits(cfg, layers, limits, counted)
    abi = landlock(cfg, layers)
    if "no_new_privs" not in layers:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        layers.append("no_new_privs")
    try:
        seccomp(cfg, layers, limits)
    except OSError as error:
        NOTES["seccomp"] = str(error)
    if cfg["audit"]:
        layers.append("audit")
    have = set(layers) | ({"process-limit"} if limits["processes"] is not None else set())
    missing = [layer for layer in cfg["required"] if layer not in have]
    record = {"layers": layers, "limits": limits, "landlock_abi": max(abi, 0), "refused": missing, "notes": NOTES}
    write_status(status_fd, record)
    os.close(status_fd)
    if missing:
        os._exit(125)
    argv = [cfg["python"], "-I", "-S", "-B", cfg["guard"], cfg["program"], "audit" if cfg["audit"] else "-"]
    argv.append(str(cfg["max_processes"]))
    os.execve(cfg["python"], argv, cfg["env"])


def run_init(cfg, layers, counted, status_fd):
    """pid 1: start the program, reap everything, and leave (taking the namespace with it) when it ends."""
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    init_mounts(cfg, layers)
    program = os.fork()
    if program == 0:
        try:
            confine_and_exec(cfg, layers, counted, status_fd)
        except BaseException:
            write_status(status_fd, {"error": error_text()})
            os._exit(126)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            code = os.waitstatus_to_exitcode(status)
            write_status(status_fd, {"returncode": code})
            os._exit(code & 0xFF)


def main():
    with open(sys.argv[-1], "rb") as f:
        cfg = marshal.load(f)
    status_fd = cfg["status_fd"]
    layers = []
    try:
        if os.geteuid() == 0:
            try:
                drop_root(cfg)
                layers.append("nobody")
            except OSError as error:
                NOTES["nobody"] = str(error)
        host_root = os.geteuid() == 0
        try:
            enter_namespaces(cfg, layers)
        except OSError as error:
            NOTES["userns"] = str(error)
            if "userns" in cfg["required"]:
                write_status(status_fd, {"layers": layers, "refused": ["userns"], "notes": NOTES})
                os._exit(125)
        if "userns" not in layers:  # weak isolation: no init; the parent kills the process group
            confine_and_exec(cfg, layers, False, status_fd)
        init = os.fork()
        if init == 0:
            try:
                run_init(cfg, layers, not host_root, status_fd)
            except BaseException:
                write_status(status_fd, {"error": error_text()})
            finally:
                os._exit(126)
        os.close(status_fd)
        _, status = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    except BaseException:
        write_status(status_fd, {"error": error_text()})
        os._exit(126)


if __name__ == "__main__":
    main()
