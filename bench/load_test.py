"""Load test of the gradprobe service: many concurrent clients diagnosing several models.

    python bench/load_test.py                      # 32 clients x 60 s on a server it starts
    python bench/load_test.py --clients 4 --duration 3 --workers 1
    python bench/load_test.py --server host:port   # an already running server

Checks, for every request: it completed with the report of its own model (sha256 and findings
byte for byte as the local engine gives them), or was refused with RESOURCE_EXHAUSTED (then the
client backs off and retries). Anything else (an error, a hang past the deadline, a report of
another model) is a failure and makes the exit code 1. Samples the server's memory (main
process and workers) while it runs.

Prints a table for people and one line for scripts:
    LOADTEST clients=32 duration_s=60 ok=... rejected=... failed=... mismatched=... rps=...
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # zoo.py: the test suite's model builders

from gradprobe.client.api import Client, RemoteError  # noqa: E402
from gradprobe.diagnostics.options import DiagnoseOptions  # noqa: E402

OPTIONS = DiagnoseOptions(seed=0, device="cpu")
REQUEST_TIMEOUT_S = 120.0
BACKOFF_S = 0.1


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    rejected: int = 0
    failed: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    rss_main_mb: list[float] = field(default_factory=list)  # samples
    rss_workers_mb: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def memory_drift_mb(self) -> float:
        """Median RSS of the last fifth of the run minus that of the first fifth."""
        samples = self.rss_main_mb
        if len(samples) < 10:
            return float("nan")
        fifth = len(samples) // 5
        return statistics.median(samples[-fifth:]) - statistics.median(samples[:fifth])

    def passed(self) -> bool:
        return not self.failed and not self.mismatched and self.ok > 0

    def line(self) -> str:
        def mb(values: list[float], pick) -> str:  # noqa: ANN001
            return f"{pick(values):.0f}" if values else "nan"

        return (f"LOADTEST clients={self.clients} duration_s={self.duration_s:.1f} ok={self.ok} "
                f"rejected={self.rejected} failed={len(self.failed)} "
                f"mismatched={len(self.mismatched)} rps={self.rps:.2f} "
                f"p50_ms={self.percentile_ms(0.50):.0f} p99_ms={self.percentile_ms(0.99):.0f} "
                f"server_rss_start_mb={mb(self.rss_main_mb, lambda v: v[0])} "
                f"server_rss_peak_mb={mb(self.rss_main_mb, max)} "
                f"server_rss_end_mb={mb(self.rss_main_mb, lambda v: v[-1])} "
                f"server_rss_drift_mb={self.memory_drift_mb():.1f} "
                f"workers_rss_peak_mb={mb(self.rss_workers_mb, max)}")

    def table(self) -> str:
        rows = [
            ("clients x duration", f"{self.clients} x {self.duration_s:.0f} s"),
            ("completed (correct report)", str(self.ok)),
            ("refused (RESOURCE_EXHAUSTED)", str(self.rejected)),
            ("failed / wrong report", f"{len(self.failed)} / {len(self.mismatched)}"),
            ("throughput", f"{self.rps:.2f} requests/s"),
            ("latency p50 / p99", f"{self.percentile_ms(0.5):.0f} / "
                                  f"{self.percentile_ms(0.99):.0f} ms"),
        ]
        if self.rss_main_mb:
            rows += [
                ("server RSS start / peak / end",
                 f"{self.rss_main_mb[0]:.0f} / {max(self.rss_main_mb):.0f} / "
                 f"{self.rss_main_mb[-1]:.0f} MB"),
                ("server RSS drift (last - first fifth)", f"{self.memory_drift_mb():+.1f} MB"),
                ("workers RSS peak (all)", f"{max(self.rss_workers_mb):.0f} MB"),
            ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- models -----------------------------------------------------------------------------------

def make_models(root: Path) -> list[Path]:
    """Five small, distinct MLPs (two with planted defects), exported to ONNX."""
    import torch
    from zoo import MLP, export_onnx

    variants = [((16, 32, 32, 8), torch.nn.ReLU, None), ((16, 64, 8), torch.nn.ReLU, None),
                ((16, 24, 24, 24, 8), torch.nn.Tanh, None), ((16, 32, 32, 8), torch.nn.ReLU, 2),
                ((16, 48, 48, 8), torch.nn.ReLU, 0)]
    paths = []
    for i, (widths, act, zero_layer) in enumerate(variants):
        torch.manual_seed(100 + i)
        model = MLP(widths, act)
        if zero_layer is not None:
            torch.nn.init.zeros_(model.net[zero_layer].weight)
        paths.append(export_onnx(model, (torch.randn(4, 16),), root / f"load_{i}.onnx"))
    return paths


def expected_reports(models: list[Path]) -> dict[str, tuple[str, list[str]]]:
    """sha256 -> (path, findings as JSON) from the local engine: what every answer must be."""
    from gradprobe.diagnostics.api import diagnose

    expected = {}
    for path in models:
        report = diagnose(path, OPTIONS)
        expected[report.model.sha256] = (str(path), [f.model_dump_json() for f in report.findings])
    return expected


# --- memory -----------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def sample_memory(pid: int, result: LoadResult, stop: threading.Event,
                  every_s: float = 0.5) -> None:
    while not stop.is_set():
        result.rss_main_mb.append(_rss_mb(pid))
        result.rss_workers_mb.append(sum(_rss_mb(c) for c in _children(pid)))
        stop.wait(every_s)


# --- server -----------------------------------------------------------------------------------

def start_server(workers: int, max_queue: int, store: Path, log: Path) -> tuple[subprocess.Popen,
                                                                                 str]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gradprobe.server.main", "--port", "0", "--workers",
             str(workers), "--max-queue", str(max_queue), "--store-dir", str(store),
             "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"listening on (\S+:\d+)", log.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")


# --- clients ----------------------------------------------------------------------------------

def run_load(address: str, models: list[Path], expected: dict[str, tuple[str, list[str]]], *,
             clients: int, duration_s: float, server_pid: int | None = None) -> LoadResult:
    result = LoadResult(clients=clients, duration_s=duration_s)
    lock = threading.Lock()
    with Client(address, timeout_s=REQUEST_TIMEOUT_S) as warm:  # uploads, once per model
        for path in models:
            warm.diagnose(path, OPTIONS)
    stop_memory = threading.Event()
    sampler = None
    if server_pid is not None:
        sampler = threading.Thread(target=sample_memory, args=(server_pid, result, stop_memory),
                                   daemon=True)
        sampler.start()
    start = time.monotonic()
    end = start + duration_s

    def client_loop(index: int) -> None:
        with Client(address, timeout_s=REQUEST_TIMEOUT_S) as client:
            turn = index
            while time.monotonic() < end:
                path = models[turn % len(models)]
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
                began = time.monotonic()
                try:
                    report = client.diagnose(path, OPTIONS)
                except RemoteError as exc:
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        with lock:
                            result.rejected += 1
                        time.sleep(BACKOFF_S)
                        continue
                    with lock:
                        result.failed.append(f"{path.name}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        result.failed.append(f"{path.name}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.monotonic() - began
                want_path, want_findings = expected[sha]
                got = [f.model_dump_json() for f in report.findings]
                with lock:
                    if (report.model.sha256 != sha or report.model.path != want_path
                            or got != want_findings):
                        result.mismatched.append(f"{path.name}: got the report of "
                                                 f"{report.model.path} ({report.model.sha256})")
                    else:
                        result.latencies_s.append(elapsed)
                turn += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.duration_s = time.monotonic() - start
    stop_memory.set()
    if sampler is not None:
        sampler.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--server", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--workers", type=int, default=2, help="for the server started here")
    parser.add_argument("--max-queue", type=int, default=16, help="for the server started here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gradprobe-load-") as tmp:
        root = Path(tmp)
        models = make_models(root)
        expected = expected_reports(models)
        process = None
        if args.server:
            address, pid = args.server, None
        else:
            process, address = start_server(args.workers, args.max_queue, root / "store",
                                            root / "server.log")
            pid = process.pid
        try:
            result = run_load(address, models, expected, clients=args.clients,
                              duration_s=args.duration, server_pid=pid)
        finally:
            if process is not None:
                process.terminate()
                process.wait(60)
    print(result.table())
    for problem in (result.failed + result.mismatched)[:10]:
        print("  problem:", problem)
    print(result.line())
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
