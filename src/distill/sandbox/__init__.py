"""Run untrusted Python (model-written code) behind a kernel-enforced boundary.

Every run (``run_python``; ``check_humaneval`` for HumanEval problems) starts a small launcher
(:mod:`distill.sandbox._launcher`) that builds the boundary and then executes the program in a fresh
``python -I -S -B`` interpreter, so nothing of the launcher (no ``ctypes`` handle) is left to the program.
Layers, as named in ``SandboxResult.layers``:

- ``nobody``: as host root, the launcher first drops to uid/gid 65534 (the interpreter's folders are made
  reachable through a private mount namespace), so the program is not root outside its namespace.
- ``userns``, ``pidns``, ``mntns``, ``ipcns``, ``utsns``, ``netns``: fresh namespaces. The program is uid 1000
  of its own user namespace, with no capabilities after exec; it is a child of pid 1 of a new pid
  namespace, and when it exits (or the run times out) that init exits and the kernel kills every
  process left in the namespace, ``setsid`` or not; no network interface but a down loopback.
- ``ro-root``: every host mount is read-only in the run's mount namespace (no write, chmod, chown, utime,
  xattr, link or delete outside; Landlock does not govern file metadata).
- ``proc``: a fresh ``/proc`` showing only the run's processes (``proc-hidden``: an empty one).
  ``tmpfs``: the run's folder is a private tmpfs of at most ``4 * max_file_mb`` MiB, the one writable place.
- ``rlimits``: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0;
  ``nproc``: ``RLIMIT_NPROC`` counted inside the user namespace, exactly ``max_processes`` (the kernel
  counts threads as well; with ``max_processes=1`` it leaves room for 64 threads).
- ``no_new_privs`` and ``landlock-fs``: the program may write only inside the run's folder, read only the
  interpreter's prefix, the system library folders, the loader cache, time zones and a few devices, and
  execute only the interpreter (and its ELF loader). ``landlock-net``: no TCP bind or connect (Landlock
  ABI >= 4); ``landlock-scope``: no signals or abstract unix sockets outside the run (ABI >= 6).
- ``seccomp``: ptrace, process_vm_*, pidfd_*, unshare / setns and namespace flags to clone, io_uring,
  keyctl, bpf, perf_event_open, userfaultfd, inotify / fanotify, mounts, chroot and module loading fail
  with EPERM; sockets other than IP and unix socketpairs (a daemon's unix socket file, vsock, netlink,
  packet, ...) fail; with ``max_processes=1`` every new process fails (EAGAIN; threads are allowed).
- ``audit``: a second layer only, an audit hook in the program's interpreter that turns common escapes
  into readable ``PermissionError``s. Code in the same interpreter can disable it (e.g. through ``gc``);
  everything it refuses, the kernel refuses too.

``isolation="strict"`` (the default) refuses to run (:class:`SandboxUnavailable`, naming the missing layer
and how to enable it) unless every layer in :data:`REQUIRED_LAYERS` is in place; ``isolation="weak"`` runs
with whatever the kernel offers and records it. ``distill doctor`` prints what this machine offers.
The program sees the standard library only (no site-packages). What the boundary is not: a defence
against kernel bugs (use a VM or gVisor for that), against side channels, or a limit on what the program
prints (up to ``max_file_mb``). docs/sandbox.md has the details, what a kernel without user namespaces or
Landlock gets, and the per-run cost.
"""

from distill.sandbox.kernel import REQUIRED_LAYERS, SandboxUnavailable
from distill.sandbox.run import SandboxError, SandboxResult, check_humaneval, humaneval_program, run_python

__all__ = [
    "REQUIRED_LAYERS",
    "SandboxError",
    "SandboxResult",
    "SandboxUnavailable",
    "check_humaneval",
    "humaneval_program",
    "run_python",
]
