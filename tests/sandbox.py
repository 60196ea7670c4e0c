"""Run a command under lrproxy.service's seccomp settings, as systemd 252 (Debian 12) sets
them up, without systemd as PID 1 (tests/test_systemd.py).

    python tests/sandbox.py UNIT_FILE -- COMMAND [ARG...]

From the unit file it takes `SystemCallFilter=` (each `@group` expanded by
`systemd-analyze syscall-filter`; a first allow-list, then `~` entries taken out of it,
with @default always in, as systemd does), `SystemCallErrorNumber=`,
`MemoryDenyWriteExecute=` and `RestrictAddressFamilies=`, builds the same kinds of seccomp
filters with libseccomp, loads them (with no_new_privs) and execs COMMAND, which keeps
them, as do its children. systemd 252 enforces MemoryDenyWriteExecute with seccomp, not
prctl(PR_SET_MDWE): an mmap that is both writable and executable, and any mprotect,
pkey_mprotect or shmat that asks for execute, fail with EPERM, as here.
The namespaces and file-system settings (ProtectSystem=, DynamicUser=, ...) are not
reproduced: they need privileges a test does not have.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ALLOW = 0x7FFF0000
CMP_EQ, CMP_GE, CMP_MASKED_EQ = 4, 5, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_MAX = 46  # <linux/socket.h>: families are below it


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings, each with every value it was given, in order."""
    out: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@functools.cache
def _group(name: str) -> frozenset[str]:
    text = subprocess.run(["systemd-analyze", "syscall-filter", name], check=True,
                          capture_output=True, text=True).stdout
    names: set[str] = set()
    for line in text.splitlines()[1:]:  # (the first line is the group's own name)
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= _group(item) if item.startswith("@") else {item}
    return frozenset(names)


def _expand(items: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for item in items:
        out |= _group(item) if item.startswith("@") else {item}
    return out


def allowed_syscalls(filters: list[str]) -> set[str]:
    """systemd's reading of SystemCallFilter= lines: the first decides allow or deny
    list; later lines of the other kind take names out. Only an allow list is handled
    (the unit has one)."""
    allowed: set[str] = set()
    for i, value in enumerate(filters):
        deny = value.startswith("~")
        names = _expand(value.lstrip("~").split())
        if i == 0 and deny:
            raise SystemExit("sandbox: only an allow-list SystemCallFilter= is handled")
        if deny:
            allowed -= names
        else:
            allowed |= names | (_group("@default") if i == 0 else set())
    return allowed


class Filter:
    """One libseccomp filter; several loaded filters all apply, the strictest wins."""

    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2",
                      use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def __init__(self, default: int) -> None:
        self.ctx = self.lib.seccomp_init(default)
        if not self.ctx:
            raise SystemExit("sandbox: seccomp_init failed")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
        """Add `action` for `name` when all of `cmps` (arg, op, datum_a, datum_b) hold."""
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call of this architecture (arm_fadvise64_64, ...)
            return False
        arr = (ArgCmp * max(1, len(cmps)))(*(ArgCmp(*c) for c in cmps))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise SystemExit(f"sandbox: seccomp_rule_add {name}: {os.strerror(-rc)}")
        return True

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        self.lib.seccomp_release(self.ctx)
        if rc < 0:
            raise SystemExit(f"sandbox: seccomp_load: {os.strerror(-rc)}")


def filters(settings: dict[str, list[str]]) -> list[Filter]:
    out = []
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        # (systemd's seccomp_memory_deny_write_execute(): the prot or flags argument,
        # masked, equal to the mask)
        f, eperm = Filter(ALLOW), errno_action(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        f.rule(eperm, "mmap", (2, CMP_MASKED_EQ, wx, wx))
        f.rule(eperm, "mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(eperm, "pkey_mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.rule(eperm, "shmat", (2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        out.append(f)
    if settings.get("RestrictAddressFamilies"):
        keep = {int(getattr(socket, name)) for name in
                " ".join(settings["RestrictAddressFamilies"]).split()}
        f, refuse = Filter(ALLOW), errno_action(errno.EAFNOSUPPORT)
        for family in range(AF_MAX):
            if family not in keep:
                f.rule(refuse, "socket", (0, CMP_EQ, family, 0))
        f.rule(refuse, "socket", (0, CMP_GE, AF_MAX, 0))
        out.append(f)
    # the system call filter last, as systemd does: the `seccomp` call it would refuse
    if settings.get("SystemCallFilter"):
        code = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
        f = Filter(errno_action(getattr(errno, code)))
        for name in sorted(allowed_syscalls(settings["SystemCallFilter"])):
            f.rule(ALLOW, name)
        out.append(f)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(__doc__)
    for f in filters(unit_settings(Path(argv[0]))):
        f.load()
    cmd = argv[2:]
    os.execvp(cmd[0], cmd)
    return 127  # (not reached)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
