"""Limits a worker process puts on itself before it touches a model: it dies with the server,
and its memory is capped so that one probe cannot take the machine.

- Death with the parent: Linux's PR_SET_PDEATHSIG sends SIGKILL when the parent dies (a
  `kill -9` of the server used to leave a busy worker running under init); a thread that
  blocks on a pipe only the parent holds open is the fallback everywhere else, and catches a
  parent that died before prctl ran.
- Memory: RLIMIT_DATA caps the worker's private writable memory (heap, anonymous mappings:
  where tensors live) without counting mapped libraries, which RLIMIT_AS would, so the
  default can follow the machine's memory. Past the cap an allocation fails; the worker
  reports RESOURCE_EXHAUSTED and is replaced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1
# A worker needs about 0.9 GB to import torch and warm up; less cannot work.
MIN_WORKER_MEMORY_MB = 1024
_BYTES_PER_DTYPE = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2,
                    "bfloat16": 2, "bool": 1}


def default_worker_memory_mb(workers: int) -> int:
    """Three quarters of the memory this process may use (the container's limit where there
    is one, else the machine's), shared by the workers."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4096
    limit = _cgroup_value("memory.max")
    if limit is not None:
        total = min(total, int(limit))
    return max(MIN_WORKER_MEMORY_MB, int(total * 0.75 / max(1, workers)) >> 20)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU quota (a pod's
    limit), so that workers do not start a thread per core of the node and get throttled."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_value("cpu.max")
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_value(name: str, *, fs_root: str = "/sys/fs/cgroup",
                  membership: str = "/proc/self/cgroup") -> float | None:
    """A cgroup v2 limit of this process ("max": none): memory.max in bytes, cpu.max as the
    CPUs its quota/period allows."""
    try:
        with open(membership) as f:
            path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")),
                        None)
        if path is None:
            return None
        with open(os.path.join(fs_root, path.lstrip("/"), name)) as f:
            fields = f.read().split()
    except (OSError, IndexError, ValueError):
        return None
    if not fields or fields[0] == "max":
        return None
    try:
        if name == "cpu.max":
            return int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000)
        return float(fields[0])
    except (ValueError, ZeroDivisionError):
        return None


def die_with_parent(parent_pid: int, lifeline: Connection | None) -> None:
    """Make this process end when `parent_pid` does."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody to serve
        os._exit(1)
    if lifeline is not None:
        threading.Thread(target=_watch_lifeline, args=(lifeline,), name="gradprobe-lifeline",
                         daemon=True).start()


def _watch_lifeline(lifeline: Connection) -> None:
    try:
        lifeline.recv()  # the parent never writes: this returns only at end-of-file
    except (EOFError, OSError):
        pass
    os._exit(1)


def limit_memory(megabytes: int) -> None:
    """Cap this process's private writable memory (RLIMIT_DATA) at `megabytes`."""
    import resource

    limit = int(megabytes) << 20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is an allocation failure."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, MemoryError):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("can't allocate memory" in text
                                              or "not enough memory" in text
                                              or "out of memory" in text.lower()):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def estimate_input_bytes(input_shapes: list[list[int]] | None,
                         input_dtypes: list[str] | None) -> int:
    """A floor for a probe's memory that the request alone tells: its inputs, held at least
    three times (the batch, a layer's output, its gradient)."""
    if not input_shapes:
        return 0
    dtypes = list(input_dtypes or ["float32"])
    total = 0
    for index, shape in enumerate(input_shapes):
        dtype = dtypes[index] if index < len(dtypes) else dtypes[-1]
        total += math.prod(shape) * _BYTES_PER_DTYPE.get(dtype, 4)
    return 3 * total
