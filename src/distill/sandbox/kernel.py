"""What the kernel offers the sandbox: the paths a confined interpreter needs, the layers it must have, and
how to get a missing one.

Nothing here confines anything; :mod:`distill.sandbox._launcher` does, in the child. These helpers run in
the caller's process (``distill doctor``, error messages, the read-only path list).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import struct
import sys
from pathlib import Path

__all__ = ["REQUIRED_LAYERS", "SandboxUnavailable", "host_report", "landlock_abi", "missing_message", "read_paths"]

# Layers without which a "strict" run is refused. Landlock's TCP rules (ABI 4) and signal / abstract-socket
# scoping (ABI 6) are applied when present but not required: the network and pid namespaces already cut
# the network, other processes' signals and abstract sockets (which live in the network namespace).
REQUIRED_LAYERS = (
    "userns",
    "pidns",
    "mntns",
    "ipcns",
    "netns",
    "landlock-fs",
    "no_new_privs",
    "rlimits",
    "seccomp",
    "process-limit",
)

_USERNS_HELP = (
    "unprivileged user namespaces are refused here. Enable them: "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (Ubuntu >= 23.10, or an AppArmor profile "
    "allowing `userns` for this Python), `sysctl -w kernel.unprivileged_userns_clone=1` (older Debian), "
    "`sysctl -w user.max_user_namespaces=15000`; in a container, a seccomp profile that allows unshare/clone "
    "(e.g. docker --security-opt seccomp=unconfined)"
)
HOW_TO = {
    "userns": _USERNS_HELP,
    "pidns": _USERNS_HELP,
    "mntns": _USERNS_HELP,
    "ipcns": _USERNS_HELP,
    "netns": _USERNS_HELP,
    "landlock-fs": (
        "Landlock is not available: it needs a kernel >= 5.13 (>= 6.2 for ABI 3 where mounts cannot be made "
        "read-only) built with CONFIG_SECURITY_LANDLOCK=y and `landlock` in the active LSM list "
        "(`cat /sys/kernel/security/lsm`; add it with the `lsm=` boot parameter)"
    ),
    "no_new_privs": "prctl(PR_SET_NO_NEW_PRIVS) failed",
    "rlimits": "setrlimit failed",
    "seccomp": (
        "no seccomp filter: it needs CONFIG_SECCOMP_FILTER and an x86_64 or aarch64 machine (the filter's syscall "
        "table); it is what refuses unix sockets to host daemons, vsock, ptrace and new processes"
    ),
    "process-limit": (
        "no kernel limit on processes: with max_processes > 1 the limit is RLIMIT_NPROC, which the kernel ignores"
        " for host uid 0; as root the sandbox runs the program as uid 65534, which failed here. Use "
        "max_processes=1 (seccomp then refuses every new process) or run as an unprivileged user"
    ),
}


class SandboxUnavailable(RuntimeError):
    """The kernel lacks a layer a ``strict`` run requires; the message names it and how to get it."""


def missing_message(missing: list[str], notes: dict[str, str]) -> str:
    """The refusal text for ``missing`` layers, with the launcher's ``notes`` (the failing call and errno)."""
    lines = [f"Refusing to run untrusted code: the sandbox could not set {', '.join(missing)}."]
    for layer in dict.fromkeys(HOW_TO.get(name, name) for name in missing):
        lines.append(f"- {layer}.")
    for layer, note in notes.items():
        lines.append(f"  ({layer}: {note})")
    lines.append('Or pass isolation="weak" to run with the layers this kernel has (recorded in the result).')
    return "\n".join(lines)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none). Only queries; restricts nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(int(libc.syscall(444, None, 0, 1)), 0)  # landlock_create_ruleset(NULL, 0, VERSION)


def _elf_interpreter(binary: str) -> str | None:
    """The dynamic loader named in an ELF binary's PT_INTERP header (64-bit little-endian), if any."""
    with open(binary, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return None
        phoff, phentsize, phnum = struct.unpack_from("<Q", header, 32)[0], *struct.unpack_from("<HH", header, 54)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            kind, _, offset, _, _, size = struct.unpack("<IIQQQQ", f.read(40))
            if kind == 3:  # PT_INTERP
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


@functools.cache
def read_paths() -> tuple[str, tuple[tuple[str, str], ...]]:
    """The interpreter to exec and what the confined program may open: ``(python, ((path, "r"|"rx"|"rw"), ...))``.

    Read: the interpreter's prefix (stdlib, lib-dynload, libpython), the system library folders, the loader
    cache, time zones, a few devices. Execute: the interpreter and its ELF loader only. Nothing else of the
    machine is visible to the program (no /home, /root, /proc, /sys, /etc beyond two files).
    """
    python = os.path.realpath(sys.executable)
    paths: dict[str, str] = {}
    prefixes = {sys.base_prefix, sys.base_exec_prefix, str(Path(python).parent.parent)}
    for prefix in sorted(prefixes):
        paths[os.path.realpath(prefix)] = "r"
    for folder in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"):
        paths.setdefault(os.path.realpath(folder), "r")
    for file in ("/etc/ld.so.cache", "/etc/localtime", "/dev/zero", "/dev/urandom", "/dev/random"):
        paths.setdefault(os.path.realpath(file), "r")
    paths[os.path.realpath("/dev/null")] = "rw"
    paths[python] = "rx"
    loader = _elf_interpreter(python)
    if loader:
        paths[os.path.realpath(loader)] = "rx"
    return python, tuple((path, kind) for path, kind in paths.items() if os.path.exists(path))


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "absent"


def host_report() -> dict[str, str]:
    """The kernel facts behind the layers, as printed by ``distill doctor``."""
    seccomp = "absent"
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("Seccomp:"):
            seccomp = "available" + (" (this process is already filtered)" if line.split()[1] != "0" else "")
    abi = landlock_abi()
    return {
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "uid": str(os.geteuid()) + (" (root: the program runs as uid 65534)" if os.geteuid() == 0 else ""),
        "landlock ABI": f"{abi}" + ("" if abi else " (none: needed)"),
        "landlock TCP rules (ABI >= 4)": "yes" if abi >= 4 else "no (kernel >= 6.7)",
        "landlock signal/socket scoping (ABI >= 6)": "yes" if abi >= 6 else "no (kernel >= 6.12)",
        "user.max_user_namespaces": _read("/proc/sys/user/max_user_namespaces"),
        "kernel.unprivileged_userns_clone": _read("/proc/sys/kernel/unprivileged_userns_clone"),
        "kernel.apparmor_restrict_unprivileged_userns": _read(
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
        ),
        "seccomp": seccomp,
        "bubblewrap": shutil.which("bwrap") or "not installed (not needed: the same namespaces are made directly)",
    }
