"""A real gradprobe server on 127.0.0.1 for the server tests: grpc.aio in a background thread
with its own event loop, workers in their own processes, a store in a temp dir. Plus the
models the tests send it, exported by the tests themselves."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import grpc
import torch
from zoo import MLP, build, example_inputs, export_onnx, export_torchscript

from gradprobe.server.app import RunningServer, ServeConfig, start_server
from gradprobe.v1 import service_pb2_grpc

# A probe that takes seconds even on many fast cores (about 2.5 TFLOP: half a minute on two
# slow cores), so that a test can act while it runs: one 2048-wide linear layer applied 24
# times (16 MB of weights) on a batch of 4096.
SLOW_WIDTH, SLOW_DEPTH, SLOW_BATCH = 2048, 24, 4096
SHARED_LIMIT_MB = 32  # the slow model has 16 MB of weights


class TiedChain(torch.nn.Module):
    """One linear layer + ReLU applied `depth` times: much compute, few weights."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = torch.relu(self.layer(x))
        return x


class ServerThread:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.running: RunningServer | None = None
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradprobe-test-server",
                                        daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.running = self.loop.run_until_complete(start_server(self.config, version="test"))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self, timeout_s: float = 240.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError("test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace_s: float = 0.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace_s), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    @property
    def address(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.port}"

    @property
    def pool(self):  # noqa: ANN201
        assert self.running is not None
        return self.running.pool

    @property
    def store_dir(self) -> Path:
        assert self.config.store_dir is not None
        return self.config.store_dir

    def stub(self, channel: grpc.Channel) -> service_pb2_grpc.GradprobeStub:
        return service_pb2_grpc.GradprobeStub(channel)

    def wait_for_workers(self, count: int, timeout_s: float = 60.0) -> list[int]:
        """Wait until `count` workers are up and idle (e.g. after one was replaced)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pool = self.pool
            ready = [w for w in list(pool._workers) if w.ready.done() and not w.dead
                     and w.running is None]
            if len(ready) >= count:
                return [w.pid for w in ready]
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} workers ready after {timeout_s}s")


_shared: dict[str, object] = {}


def _scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def shared_server() -> ServerThread:
    """One server for every test module that needs no special configuration: starting workers
    costs seconds (torch import, warm-up), so modules share it. One worker, one place in the
    queue (the overload tests rely on that), models up to SHARED_LIMIT_MB."""
    if "server" not in _shared:
        server = start_test_server(_scratch_dir("gradprobe-shared-server-"), workers=1,
                                   max_queue=1, max_model_mb=SHARED_LIMIT_MB)
        atexit.register(server.stop)
        _shared["server"] = server
    return _shared["server"]  # type: ignore[return-value]


def shared_models() -> Models:
    if "models" not in _shared:
        _shared["models"] = Models(_scratch_dir("gradprobe-test-models-"))
    return _shared["models"]  # type: ignore[return-value]


def start_test_server(tmp: Path, **overrides) -> ServerThread:
    config = replace(ServeConfig(host="127.0.0.1", port=0, workers=1, max_queue=4,
                                 timeout_s=120.0, store_dir=tmp / "store", grace_s=5.0),
                     **overrides)
    return ServerThread(config).start()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pid: int, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while pid_alive(pid):
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"process {pid} still alive after {timeout_s}s")
        time.sleep(0.05)
    return time.monotonic() - start


class Models:
    """Model files for the server tests, each exported on first use."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root

    @cached_property
    def onnx(self) -> Path:
        return export_onnx(build("mlp"), example_inputs("mlp"), self.root / "mlp.onnx")

    @cached_property
    def torchscript(self) -> Path:
        return export_torchscript(build("mlp"), example_inputs("mlp"), self.root / "mlp.pt")

    @cached_property
    def defect(self) -> Path:
        torch.manual_seed(1)
        zero = MLP()
        torch.nn.init.zeros_(zero.net[2].weight)  # a planted defect, so there are findings
        return export_onnx(zero, example_inputs("mlp"), self.root / "defect.onnx")

    @cached_property
    def slow(self) -> Path:
        torch.manual_seed(2)
        slow = TiedChain(SLOW_WIDTH, SLOW_DEPTH)
        return export_onnx(slow, (torch.randn(2, SLOW_WIDTH),), self.root / "slow.onnx")

    @cached_property
    def truncated(self) -> Path:
        data = self.onnx.read_bytes()
        path = self.root / "truncated.onnx"
        path.write_bytes(data[: len(data) // 2])
        return path

    @cached_property
    def random(self) -> Path:
        path = self.root / "random.onnx"
        path.write_bytes(os.urandom(4096))
        return path

    @cached_property
    def broken_torchscript(self) -> Path:
        raw = bytearray(self.torchscript.read_bytes())
        raw[len(raw) // 3: len(raw) // 3 + 2048] = os.urandom(2048)  # a zip with a bad member
        path = self.root / "broken.pt"
        path.write_bytes(bytes(raw))
        return path


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def make_certificates(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed
    by that CA, made with the openssl command line."""
    root.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    (root / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext)
    return {n: root / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                  "client.key")}
