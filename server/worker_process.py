"""The code that runs inside a worker process (started with the `spawn` method: torch is not
fork-safe). It imports the engine once, then serves jobs from its pipe until the pipe closes.

Messages, child -> parent, each a tuple:
  ("ready", About)                    once, after the engine is imported
  ("progress", stage, fraction)      throttled
  ("report", Report)                 the job's result
  ("error", class name, message)     a GradprobeError: the user's input is at fault
  ("memory", message)                 an allocation failed (--worker-memory-mb): the parent
                                      answers RESOURCE_EXHAUSTED and replaces this worker
  ("internal", message)              anything else: a fault of gradprobe itself
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import Any

# Progress is sent when the stage changes or the fraction moved at least this much.
_PROGRESS_STEP = 0.05


@dataclass(frozen=True)
class Job:
    sha256: str
    model_path: str  # inside the store; never shown to the client
    options: Any  # DiagnoseOptions
    path_label: str | None  # what the report shows as model.path


@dataclass(frozen=True)
class WorkerSettings:
    threads: int
    parent_pid: int
    memory_mb: int | None = None  # RLIMIT_DATA; None: no limit
    scratch_root: str | None = None  # each worker writes only below <root>/worker-<pid>
    store_dir: str | None = None  # never readable from a confined worker
    sandbox: bool = True  # Landlock/seccomp/no_new_privs where the kernel has them
    user: str | None = None  # setuid to this user after set-up (server started as root)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    description: str
    memory_bytes: int = 0


@dataclass(frozen=True)
class About:
    devices: list[DeviceInfo] = field(default_factory=list)
    # Serialized gradprobe.v1.RuleDoc messages: unpickling RuleDoc objects would import the
    # rules, and torch with them, into the server process, which has no other use for it.
    rules: list[bytes] = field(default_factory=list)
    confinement: list[str] = field(default_factory=list)  # what holds (sandbox.confine)


def _devices() -> list[DeviceInfo]:
    import platform

    import torch

    found = [DeviceInfo("cpu", platform.processor() or platform.machine())]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(DeviceInfo(f"cuda:{i}", props.name, int(props.total_memory)))
    return found


class _Progress:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stage = ""
        self.fraction = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        if stage == self.stage and fraction - self.fraction < _PROGRESS_STEP and fraction < 1.0:
            return
        self.stage, self.fraction = stage, fraction
        self.conn.send(("progress", stage, float(fraction)))


def _scrub(message: str, job: Job) -> str:
    """Belt and braces: whatever names the store's file in a message is replaced by what the
    client calls it; the store's paths never leave the server."""
    label = job.path_label
    return (message.replace(job.model_path, label or job.sha256)
            .replace(Path(job.model_path).name, Path(label).name if label else job.sha256))


def run_job(job: Job, conn: Connection, model: int | None = None) -> tuple:
    """The engine call the client would make locally, on the model's bytes labelled with the
    client's name for it, so reports and error messages match. Bytes, never the store's path:
    the store is not a model's folder, and an upload may read no other file."""
    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.errors import GradprobeError

    from gradprobe.server.worker_limits import is_out_of_memory

    try:
        if model is None:
            data = Path(job.model_path).read_bytes()
        else:  # a descriptor the server opened: a confined worker cannot open the store
            with os.fdopen(model, "rb") as file:
                data = file.read()
        report = diagnose(data, job.options, progress=_Progress(conn),
                          path_label=job.path_label, self_contained=True)
    except MemoryError:
        return ("memory", "the probe ran out of the worker's memory (--worker-memory-mb)")
    except Exception as exc:
        if is_out_of_memory(exc):
            return ("memory", "the probe ran out of the worker's memory (--worker-memory-mb)")
        if isinstance(exc, GradprobeError):
            return ("error", type(exc).__name__, _scrub(str(exc), job))
        # a fault of ours; the parent logs it and answers INTERNAL
        return ("internal", _scrub(f"{type(exc).__name__}: {exc}", job))
    report.model.path = job.path_label
    return ("report", report)


def _tiny_models() -> list[bytes]:
    """A two-layer ReLU network as ONNX and as TorchScript, built in memory."""
    import io

    import numpy as np
    import onnx
    import torch
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)
               for name, shape in (("fc1.weight", (8, 4)), ("fc1.bias", (8,)),
                                   ("fc2.weight", (2, 8)), ("fc2.bias", (2,)))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], "/fc1/Gemm", transB=1),
         helper.make_node("Relu", ["h"], ["a"], "/relu/Relu"),
         helper.make_node("Gemm", ["a", "fc2.weight", "fc2.bias"], ["y"], "/fc2/Gemm", transB=1)],
        "warm_up",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 2])],
        weights)
    onnx_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(module, torch.zeros(4, 4)), buffer)
    return [onnx_bytes.SerializeToString(), buffer.getvalue()]


def _warm_up() -> None:
    """Run the engine once on tiny models: the first probe in a process pays for lazy
    initialisation in torch (seconds on a slow machine), which no request should."""
    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.options import DiagnoseOptions

    try:
        for model in _tiny_models():
            diagnose(model, DiagnoseOptions(input_shapes=[[4, 4]], device="cpu"))
    except Exception as exc:  # a warm-up problem must not keep the worker from serving
        logging.getLogger("gradprobe.server").warning("worker warm-up failed: %s", exc)


def _confine(settings: WorkerSettings) -> tuple[Path | None, list[str]]:
    """Per-worker scratch folder (TMPDIR), another user, then the sandbox: irreversible."""
    from gradprobe.server.sandbox import confine, drop_privileges, readable_paths

    scratch = None
    if settings.scratch_root:
        scratch = Path(settings.scratch_root) / f"worker-{os.getpid()}"
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["TMPDIR"] = str(scratch)
        tempfile.tempdir = str(scratch)
    held = []
    if settings.user:
        import pwd

        if scratch is not None:
            entry = pwd.getpwnam(settings.user)
            os.chown(scratch, entry.pw_uid, entry.pw_gid)
        held.append(f"user={drop_privileges(settings.user)}")
    if settings.sandbox and scratch is not None:
        never = Path(settings.store_dir) if settings.store_dir else None
        devices = []
        import torch

        if torch.cuda.is_available():  # open the driver's devices before they are out of reach
            torch.cuda.init()
            devices = sorted(Path("/dev").glob("nvidia*"))
        held += confine(scratch, readable_paths(never), devices)
    return scratch, held


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def worker_main(conn: Connection, settings: WorkerSettings, describe: bool,
                lifeline: Connection | None = None) -> None:
    """Entry point of a worker process."""
    from gradprobe.server.worker_limits import die_with_parent, limit_memory

    die_with_parent(settings.parent_pid, lifeline)  # never outlive the server
    # The parent decides when workers stop: a Ctrl-C or SIGTERM sent to the whole process group
    # must not kill a probe the server is still draining. Workers exit when their pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    # The CUDA driver maps large private regions of its own: on a CUDA worker RLIMIT_DATA
    # could refuse the context itself, so there the parent's watchdog on resident memory
    # (workers.py) is the cap, and GPU allocations fail with torch's own out-of-memory error.
    if settings.memory_mb and not torch.cuda.is_available():
        limit_memory(settings.memory_mb)
    torch.set_num_threads(max(1, settings.threads))
    # Import the engine once, before the first job, so that no request pays for it.
    import gradprobe.diagnostics.api  # noqa: F401
    import gradprobe.diagnostics.loaders.onnx_loader  # noqa: F401
    import gradprobe.diagnostics.loaders.torchscript_loader  # noqa: F401
    from gradprobe.diagnostics.rules import all_rules
    from gradprobe.server.convert import rule_doc_to_proto

    _warm_up()
    scratch, confinement = _confine(settings)

    about = About(_devices(), [rule_doc_to_proto(rule.doc()).SerializeToString()
                               for rule in all_rules()], confinement) if describe else None
    conn.send(("ready", about))
    while True:
        try:
            job = conn.recv()
            model = recv_handle(conn) if job is not None else None
        except (EOFError, OSError):
            return
        if job is None:
            return
        result = run_job(job, conn, model)
        if scratch is not None:
            _empty(scratch)  # each job starts with an empty scratch folder
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # the result did not pickle
            conn.send(("internal", f"cannot send the result: {type(exc).__name__}: {exc}"))
        if result[0] == "memory":
            return  # the parent replaces this worker: its heap may be left fragmented
        del result
        gc.collect()
