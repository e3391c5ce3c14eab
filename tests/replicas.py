"""A local fleet for the scale-out test and bench/scale_out.py: `gradprobe serve` replicas as
real processes on 127.0.0.1 (each with its own store, metrics port and log), nginx as a gRPC
load balancer in front of them, and a load driver that checks every answer.

Only loopback addresses are used; every loop is bounded in time."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gradprobe.client.api import Client, RemoteError
from gradprobe.diagnostics.options import DiagnoseOptions

OPTIONS = DiagnoseOptions(seed=0, device="cpu")
START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_text(port: int) -> str:
    """The body of http://127.0.0.1:PORT/metrics (its content type checked)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        if not response.headers["Content-Type"].startswith("text/plain"):
            raise AssertionError(f"/metrics served as {response.headers['Content-Type']}")
        return response.read().decode()


def parse_metrics(text: str) -> Samples:
    """Every sample, keyed by name and sorted labels, parsed by prometheus_client's parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@dataclass
class Replica:
    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        return metrics_text(self.metrics_port)

    def metrics(self) -> Samples:
        return parse_metrics(self.metrics_text())

    def lint_ok(self) -> float:
        return self.metrics().get(
            ("gradprobe_requests_total", (("code", "OK"), ("method", "Lint"))), 0.0)

    def alive(self) -> bool:
        return self.process.poll() is None


def start_replicas(count: int, root: Path, *, workers: int = 1, max_queue: int = 64,
                   grace_s: float = 20.0, extra: Sequence[str] = ()) -> list[Replica]:
    """`count` replicas started at once (their workers import torch in parallel); returns when
    every one is serving."""
    root.mkdir(parents=True, exist_ok=True)
    launched = []
    for index in range(count):
        name = f"r{index}"
        port, metrics_port = free_port(), free_port()
        log = root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gradprobe.server.main", "--port", str(port),
                 "--metrics-port", str(metrics_port), "--replica-name", name,
                 "--workers", str(workers), "--max-queue", str(max_queue),
                 "--grace-s", str(grace_s), "--store-dir", str(root / f"{name}-store"),
                 "--device", "cpu", *extra],
                stdout=out, stderr=subprocess.STDOUT)
        launched.append(Replica(name, process, port, metrics_port, log))
    deadline = time.monotonic() + START_TIMEOUT_S
    for replica in launched:
        while "listening on" not in replica.log.read_text(errors="replace"):
            if replica.process.poll() is not None or time.monotonic() > deadline:
                stop_replicas(launched)
                raise RuntimeError(f"replica {replica.name} did not start:\n"
                                   f"{replica.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
    return launched


def stop_replicas(replicas: Sequence[Replica]) -> None:
    for replica in replicas:
        if replica.alive():
            replica.process.send_signal(signal.SIGTERM)
    for replica in replicas:
        try:
            replica.process.wait(60)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait(10)


# --- nginx ------------------------------------------------------------------------------------

def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream gradprobe {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        # A Lint stream carries the model: the body limit is the server's --max-model-mb.
        client_max_body_size 0;
        client_body_timeout 600s;
        grpc_read_timeout 600s;
        grpc_send_timeout 600s;
        # A replica that refuses the connection is skipped; a stream it already answered is
        # never moved (nginx retries only before it sent anything back).
        grpc_next_upstream error timeout;
        location / {{
            grpc_pass grpc://gradprobe;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground as a gRPC balancer over `backends` (round robin per call)."""

    def __init__(self, backends: Sequence[str], root: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        servers = "\n".join(f"        server {b} max_fails=1 fail_timeout=30s;" for b in backends)
        self.conf = root / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(root=root, servers=servers, port=self.port))
        self.log = root / "error.log"
        self.process = subprocess.Popen([binary, "-c", str(self.conf), "-p", str(root)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start: " + (
                        self.log.read_text(errors="replace") if self.log.exists() else "")) \
                        from None
                time.sleep(0.1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# --- models and expected answers --------------------------------------------------------------

def make_models(root: Path, count: int = 4) -> list[Path]:
    """`count` small, distinct MLPs (every other one with a zeroed layer), exported to ONNX."""
    import torch
    from zoo import MLP, export_onnx

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        torch.manual_seed(200 + i)
        widths = (16, 24 + 8 * (i % 5), 16, 8)
        model = MLP(widths, torch.nn.ReLU)
        if i % 2:
            torch.nn.init.zeros_(model.net[2].weight)
        paths.append(export_onnx(model, (torch.randn(4, 16),), root / f"fleet_{i}.onnx"))
    return paths


def expected_findings(models: Sequence[Path]) -> dict[str, list[str]]:
    """sha256 -> the findings (as JSON) the local engine gives: what every answer must be."""
    from gradprobe.diagnostics.api import diagnose

    reports = [diagnose(path, OPTIONS) for path in models]
    return {r.model.sha256: [f.model_dump_json() for f in r.findings] for r in reports}


# --- the load ---------------------------------------------------------------------------------

@dataclass
class FleetLoad:
    """What a load run saw. A job is one model file sent with a unique label; it counts as
    done when its own report came back, however many tries that took."""

    jobs: int = 0
    done: int = 0
    tries_failed: Counter = field(default_factory=Counter)  # status -> count (then re-sent)
    mismatched: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # never done before the run ended
    by_replica: Counter = field(default_factory=Counter)  # replica -> jobs it accepted
    duration_s: float = 0.0
    timeline: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.done / self.duration_s if self.duration_s else 0.0


# A try may fail with these (a replica died under it, or was overloaded); the driver sends the
# job again, as a CI client would. Any other status is a failure of the run.
RETRIED = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
MAX_TRIES = 20


def run_load(target: str, models: Sequence[Path], expected: dict[str, list[str]], *,
             clients: int, duration_s: float,
             events: Sequence[tuple[float, Callable[[], None]]] = (),
             request_timeout_s: float = 300.0) -> FleetLoad:
    """`clients` threads, each with its own Client on `target`, send jobs for `duration_s`;
    `events` run at their offsets (e.g. kill a replica). Jobs started before the end are
    finished (a bounded number of tries each)."""
    result = FleetLoad()
    lock = threading.Lock()
    shas = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in models}
    start = time.monotonic()
    end = start + duration_s

    def one_job(client: Client, label: str, path: Path) -> None:
        for _ in range(MAX_TRIES):
            try:
                report = client.diagnose(path, OPTIONS, path_label=label)
            except RemoteError as exc:
                code = exc.code.name if exc.code is not None else "UNKNOWN"
                with lock:
                    result.tries_failed[code] += 1
                if code not in RETRIED:
                    with lock:
                        result.lost.append(f"{label}: {code}: {exc}")
                    return
                time.sleep(0.2)
                continue
            findings = [f.model_dump_json() for f in report.findings]
            with lock:
                if (report.model.path != label or report.model.sha256 != shas[path]
                        or findings != expected[shas[path]]):
                    result.mismatched.append(f"{label}: got {report.model.path} "
                                             f"({report.model.sha256[:12]})")
                else:
                    result.done += 1
                    result.by_replica[client.last_replica] += 1
            return
        with lock:
            result.lost.append(f"{label}: still failing after {MAX_TRIES} tries")

    def client_loop(index: int) -> None:
        with Client(target, timeout_s=request_timeout_s) as client:
            turn = 0
            while time.monotonic() < end:
                path = models[(index + turn) % len(models)]
                with lock:
                    result.jobs += 1
                one_job(client, f"client{index}/job{turn}/{path.name}", path)
                turn += 1

    def run_events() -> None:
        for offset, action in sorted(events, key=lambda e: e[0]):
            pause = start + offset - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            action()
            with lock:
                result.timeline.append(f"t={time.monotonic() - start:.1f}s {action.__name__}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(clients)]
    scheduler = threading.Thread(target=run_events, daemon=True)
    scheduler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + request_timeout_s * 2)
    scheduler.join(5)
    result.duration_s = time.monotonic() - start
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        result.lost.append(f"{stuck} client thread(s) still waiting at the end")
    return result


def wait_serving(target: str, timeout_s: float = 60.0) -> None:
    """Until a health check through `target` (a replica or the balancer) says SERVING."""
    deadline = time.monotonic() + timeout_s
    with Client(target) as client:
        while True:
            try:
                if client.health(timeout_s=5) == "SERVING":
                    return
            except RemoteError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} is not serving after {timeout_s:.0f}s")
            time.sleep(0.2)


__all__ = ["FleetLoad", "Nginx", "Replica", "expected_findings", "make_models",
           "nginx_binary", "run_load", "start_replicas", "stop_replicas", "wait_serving"]
