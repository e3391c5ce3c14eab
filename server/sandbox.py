"""Confinement of a worker process, the second wall behind the operator allowlist: should a
model ever get code to run, the worker it runs in can write only to its scratch directory,
read only the Python/torch installation, start no process and open no network socket.

Applied once, after torch is imported and warmed up and before the first job; irreversible.
Each layer is used where the kernel has it and skipped cleanly where it does not; `confine`
returns what holds, and the server logs it (docs/security.md: what holds where).

- Landlock (Linux >= 5.13, ABI detected): file-system access limited to reading the install
  and writing the scratch directory, no execute right anywhere (no execve); ABI >= 4: no TCP
  bind/connect; ABI >= 6: no abstract unix sockets or signals outside the worker.
- seccomp (x86_64): execve/execveat, fork/vfork, clone without CLONE_THREAD and sockets other
  than AF_UNIX fail with EPERM (clone3 with ENOSYS, so that glibc falls back to clone).
- PR_SET_NO_NEW_PRIVS: required by both; setuid binaries gain nothing.
- Another user (`--worker-user`, when the server runs as root): setgid/setuid after set-up.

The model itself reaches the worker as an open file descriptor (workers.py), so the store
folder is not readable from inside.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import struct
import sys
from pathlib import Path

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Landlock (include/uapi/linux/landlock.h)
_SYS_LANDLOCK = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2
_FS = {name: 1 << bit for bit, name in enumerate((
    "execute", "write_file", "read_file", "read_dir", "remove_dir", "remove_file",
    "make_char", "make_dir", "make_reg", "make_sock", "make_fifo", "make_block", "make_sym",
    "refer", "truncate", "ioctl_dev"))}
_FS_BY_ABI = {1: 13, 2: 14, 3: 15, 5: 16}  # how many of the rights above each ABI knows
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none."""
    numbers = _SYS_LANDLOCK.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return 0
    version = _libc().syscall(numbers[0], None, ctypes.c_size_t(0),
                              ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, version)


def confine(scratch: Path, readable: list[Path], devices: list[Path] | None = None
            ) -> list[str]:
    """Confine this process (see the module's docstring). `devices`: device nodes the worker
    keeps using (a GPU's /dev/nvidia*): read, write and ioctl. Returns the layers that hold."""
    if not sys.platform.startswith("linux"):
        return []
    libc = _libc()
    held = []
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        held.append("no_new_privs")
    abi = landlock_abi()
    if abi and "no_new_privs" in held and _landlock(libc, abi, scratch, readable,
                                                     devices or []):
        held.append(f"landlock-abi-{abi}")
    if "no_new_privs" in held and _seccomp(libc):
        held.append("seccomp")
    return held


def drop_privileges(user: str) -> str:
    """setgid/setuid to `user` (the server started as root); returns it, or raises OSError."""
    import pwd

    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    return user


def readable_paths(never: Path | None = None) -> list[Path]:
    """What a worker must read: the interpreter, its libraries and every imported module's
    folder, system libraries, and a few files torch and OpenMP look at. Nothing that holds
    `never` (the model store), and never the current folder or `/` as a whole."""
    candidates = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
                  Path(sys.executable).resolve().parent}
    candidates |= {Path(p) for p in sys.path if p not in ("", ".")}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file:
            candidates.add(Path(file).resolve().parent)
    candidates |= {Path(p) for p in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share",
                                     "/etc/ld.so.cache", "/etc/localtime", "/proc/self",
                                     "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu",
                                     "/sys/fs/cgroup", "/dev/null", "/dev/urandom",
                                     "/proc/driver/nvidia", "/sys/bus/pci/devices")}
    existing = sorted({p.resolve() for p in candidates if p.exists()})
    blocked = never.resolve() if never is not None else None
    existing = [p for p in existing if len(p.parts) > 1
                and not (blocked is not None and (p == blocked or p in blocked.parents))]
    # a folder inside one already listed adds nothing
    return [p for p in existing if not any(q != p and q in p.parents for q in existing)]


def _landlock(libc: ctypes.CDLL, abi: int, scratch: Path, readable: list[Path],
              devices: list[Path]) -> bool:
    create, add_rule, restrict = _SYS_LANDLOCK[platform.machine()]
    known = _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= abi)]
    handled_fs = sum(list(_FS.values())[:known])
    handled_net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    # struct landlock_ruleset_attr: u64 handled_access_fs, u64 handled_access_net, u64 scoped
    attr = struct.pack("QQQ", handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    buffer = ctypes.create_string_buffer(attr[:size], size)
    ruleset = libc.syscall(create, buffer, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        read = _FS["read_file"] | _FS["read_dir"]
        write = handled_fs & ~_FS["execute"]
        device = (_FS["read_file"] | _FS["write_file"] | _FS["ioctl_dev"]) & handled_fs
        rules = [(path, read) for path in readable] + [(scratch, write)]
        rules += [(path, device) for path in devices]
        for path, access in rules:
            if not _allow_path(libc, add_rule, ruleset, path, access):
                return False
        # no net rules: every TCP bind/connect is refused (ABI >= 4)
        return libc.syscall(restrict, ruleset, ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _allow_path(libc: ctypes.CDLL, add_rule: int, ruleset: int, path: Path,
                access: int) -> bool:
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError:
        return True  # gone since it was listed: nothing to allow
    try:
        if not path.is_dir():  # files take only file rights
            access &= (_FS["read_file"] | _FS["write_file"] | _FS["truncate"] | _FS["execute"]
                       | _FS["ioctl_dev"])
        # struct landlock_path_beneath_attr (packed): u64 allowed_access, s32 parent_fd
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        return libc.syscall(add_rule, ruleset, ctypes.c_int(_RULE_PATH_BENEATH), rule,
                            ctypes.c_uint32(0)) == 0
    finally:
        os.close(fd)


# seccomp-bpf (x86_64 only: syscall numbers differ per architecture)
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR = {"clone": 56, "fork": 57, "vfork": 58, "execve": 59, "socket": 41, "execveat": 322,
       "clone3": 435}
_CLONE_THREAD = 0x00010000
_AF_UNIX = 1
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | 1
_RET_ENOSYS = 0x00050000 | 38
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06


def _seccomp(libc: ctypes.CDLL) -> bool:
    if platform.machine() != "x86_64":
        return False
    filters = _assemble([
        ("ld", 4),                                     # seccomp_data.arch
        ("jeq", _AUDIT_ARCH_X86_64, "x86_64", "allow"),
        ("x86_64", "ld", 0),                           # seccomp_data.nr
        ("jeq", _NR["execve"], "eperm", None),
        ("jeq", _NR["execveat"], "eperm", None),
        ("jeq", _NR["fork"], "eperm", None),
        ("jeq", _NR["vfork"], "eperm", None),
        ("jeq", _NR["clone3"], "enosys", None),         # glibc then falls back to clone
        ("jeq", _NR["clone"], "clone", None),
        ("jeq", _NR["socket"], "socket", None),
        ("ret", _RET_ALLOW),
        ("clone", "ld", 16),                           # args[0]: clone flags (low word)
        ("jset", _CLONE_THREAD, "allow", "eperm"),     # a thread, not a process
        ("socket", "ld", 16),                          # args[0]: address family
        ("jeq", _AF_UNIX, "allow", "eperm"),
        ("eperm", "ret", _RET_EPERM),
        ("allow", "ret", _RET_ALLOW),
        ("enosys", "ret", _RET_ENOSYS),
    ])
    count = len(filters) // 8
    buffer = ctypes.create_string_buffer(filters, len(filters))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", count,
                                                    ctypes.addressof(buffer)), 16)
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog, 0, 0) == 0


def _assemble(lines: list[tuple]) -> bytes:
    """A tiny classic-BPF assembler: each line is (label?, op, k[, true label, false label]);
    a None label falls through."""
    parsed = []
    labels = {}
    for line in lines:
        if line[0] not in ("ld", "jeq", "jset", "ret"):
            labels[line[0]] = len(parsed)
            line = line[1:]
        parsed.append(line)
    codes = {"ld": _LD_W_ABS, "jeq": _JEQ_K, "jset": _JSET_K, "ret": _RET_K}
    out = b""
    for pc, (op, k, *targets) in enumerate(parsed):
        jumps = [0 if t is None else labels[t] - pc - 1 for t in targets] + [0, 0]
        out += struct.pack("HBBI", codes[op], jumps[0], jumps[1], k)
    return out
