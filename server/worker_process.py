"""The code that runs inside a worker process (started with the `spawn` method: torch is not
fork-safe). It imports the engine once, then serves jobs from its pipe until the pipe closes.

Messages, child -> parent, each a tuple:
  ("ready", About)                    once, after the engine is imported
  ("progress", stage, fraction)      throttled
  ("report", Report)                 the job's result
  ("error", class name, message)     a GradprobeError: the user's input is at fault
  ("internal", message)              anything else: a fault of gradprobe itself
"""

from __future__ import annotations

import gc
import logging
import signal
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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


def run_job(job: Job, conn: Connection) -> tuple:
    """The engine call the client would make locally, on the model's bytes labelled with the
    client's name for it, so reports and error messages match. Bytes, never the store's path:
    the store is not a model's folder, and an upload may read no other file."""
    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.errors import GradprobeError

    path = Path(job.model_path)
    try:
        report = diagnose(path.read_bytes(), job.options, progress=_Progress(conn),
                          path_label=job.path_label, self_contained=True)
    except GradprobeError as exc:
        return ("error", type(exc).__name__, _scrub(str(exc), job))
    except Exception as exc:  # a fault of ours; the parent logs it and answers INTERNAL
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


def worker_main(conn: Connection, threads: int, describe: bool) -> None:
    """Entry point of a worker process."""
    # The parent decides when workers stop: a Ctrl-C or SIGTERM sent to the whole process group
    # must not kill a probe the server is still draining. Workers exit when their pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    torch.set_num_threads(max(1, threads))
    # Import the engine once, before the first job, so that no request pays for it.
    import gradprobe.diagnostics.api  # noqa: F401
    import gradprobe.diagnostics.loaders.onnx_loader  # noqa: F401
    import gradprobe.diagnostics.loaders.torchscript_loader  # noqa: F401
    from gradprobe.diagnostics.rules import all_rules
    from gradprobe.server.convert import rule_doc_to_proto

    _warm_up()

    about = About(_devices(), [rule_doc_to_proto(rule.doc()).SerializeToString()
                               for rule in all_rules()]) if describe else None
    conn.send(("ready", about))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        result = run_job(job, conn)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # the result did not pickle
            conn.send(("internal", f"cannot send the result: {type(exc).__name__}: {exc}"))
        del result
        gc.collect()
