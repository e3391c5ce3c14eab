"""Assemble and run the grpc.aio server: store, worker pool, servicer, interceptors, health,
reflection, TLS. `start_server` is what `gradprobe serve` and the tests call."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from gradprobe.diagnostics.errors import ConfigError
from gradprobe.server.interceptors import AuthInterceptor, ErrorMapInterceptor
from gradprobe.server.limits import StreamLimitInterceptor, channel_options
from gradprobe.server.metrics import MetricsEndpoint, ServerMetrics
from gradprobe.server.servicer import CHUNK_BYTES, GradprobeServicer, ServiceLimits
from gradprobe.server.store import ModelStore
from gradprobe.server.worker_limits import default_worker_memory_mb
from gradprobe.server.workers import WorkerPool
from gradprobe.v1 import service_pb2, service_pb2_grpc

log = logging.getLogger("gradprobe.server")

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["Gradprobe"].full_name
# Largest message accepted: an upload chunk plus framing, with room for clients that send
# bigger chunks than they should.
MAX_RECEIVE_BYTES = 4 * CHUNK_BYTES
# Reports of large models are big (per-layer and per-parameter statistics).
MAX_SEND_BYTES = 256 << 20


def default_store_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "gradprobe" / "store"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (RunningServer.port tells which)
    workers: int = 1
    max_model_mb: float = 512.0
    max_queue: int = 16
    timeout_s: float | None = 600.0  # per probe
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, client certificates required
    device: str = "auto"
    store_dir: Path | None = None
    grace_s: float = 30.0  # how long SIGTERM waits for in-flight calls
    # Stream and connection limits (server/limits.py, docs/security.md).
    max_open_streams: int = 128  # health Watch + reflection streams, no token needed
    max_uploads: int = 64  # uploads receiving bytes at once (each holds a temp file)
    max_calls: int = 2048  # concurrent calls of any kind, server-wide
    upload_idle_s: float = 30.0  # an upload with no message for this long is cancelled
    streams_per_connection: int = 32
    max_connection_age_s: float = 1800.0
    reflection: bool = False  # server reflection is opt-in (and needs the token when set)
    worker_memory_mb: int | None = None  # per worker; None: from the machine's memory
    store_max_gb: float | None = None  # store quota, LRU eviction; None: no quota
    sandbox: bool = True  # confine workers (server/sandbox.py) where the kernel allows
    worker_user: str | None = None  # workers setuid to this user (server started as root)
    metrics_port: int | None = None  # Prometheus /metrics on host:port; None: off; 0: any port
    replica: str | None = None  # this replica's name in Lint's Accepted event; None: host:port

    @property
    def max_model_bytes(self) -> int:
        return int(self.max_model_mb * 1024 * 1024)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))
    client_ca = _read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class RunningServer:
    def __init__(self, server: aio.Server, pool: WorkerPool,
                 health: health_aio.HealthServicer, port: int, config: ServeConfig,
                 metrics: ServerMetrics, metrics_endpoint: MetricsEndpoint | None) -> None:
        self.server = server
        self.pool = pool
        self.health = health
        self.port = port
        self.config = config
        self.metrics = metrics
        self.metrics_endpoint = metrics_endpoint

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish for `grace_s`, cancel
        the rest, then stop the workers."""
        await self.health.enter_graceful_shutdown()
        self.pool.drain()
        await self.server.stop(self.config.grace_s if grace_s is None else grace_s)
        await self.pool.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.pool.scratch_root:
            shutil.rmtree(self.pool.scratch_root, ignore_errors=True)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServeConfig, *, version: str) -> RunningServer:
    """Bind the port, start the workers, then serve. Raises ConfigError for bad settings
    (files, port) before any worker is started."""
    credentials = _credentials(config)
    metrics = ServerMetrics()
    store = ModelStore(config.store_dir or default_store_dir(), config.max_model_bytes,
                       max_receiving=config.max_uploads,
                       max_bytes=None if config.store_max_gb is None
                       else int(config.store_max_gb * (1 << 30)), metrics=metrics)
    interceptors: list[aio.ServerInterceptor] = []
    if config.token:
        interceptors.append(AuthInterceptor(config.token, metrics))
    interceptors.append(StreamLimitInterceptor(max_open_streams=config.max_open_streams))
    interceptors.append(ErrorMapInterceptor(metrics))
    server = aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            *channel_options(
                streams_per_connection=config.streams_per_connection,
                max_connection_age_s=config.max_connection_age_s,
                # a probe admitted just before the connection's end may still finish
                connection_age_grace_s=(config.timeout_s or 600.0) + 60.0),
        ],
        # Guard against floods of cheap calls. Streams anyone may open have their own, lower
        # cap (StreamLimitInterceptor), idle uploads end after --upload-idle-s, Diagnose is
        # bounded by the queue: so that no class starves the rest, health Check included.
        maximum_concurrent_rpcs=max(config.max_calls, config.max_open_streams + 256),
    )
    target = f"[{config.host}]:{config.port}" if ":" in config.host \
        else f"{config.host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {target}: {exc}") from None

    memory_mb = config.worker_memory_mb or default_worker_memory_mb(config.workers)
    # workers write only below here (never the store): one folder each, emptied after a job
    scratch_root = tempfile.mkdtemp(prefix="gradprobe-scratch-")
    if config.worker_user:
        os.chmod(scratch_root, 0o711)  # the workers' user must reach its own folder
    pool = WorkerPool(config.workers, config.max_queue, memory_mb=memory_mb,
                      scratch_root=scratch_root, store_dir=str(store.root),
                      sandbox=config.sandbox, user=config.worker_user, metrics=metrics)
    metrics.observe_sources(queue_depth=lambda: pool.waiting,
                            busy_workers=lambda: len(pool.busy_pids()),
                            workers=lambda: len(pool.pids),
                            store_bytes=lambda: store.used_bytes)
    await pool.start()
    endpoint = None
    try:
        devices = [d.name for d in pool.about.devices] if pool.about else []
        if config.device == "cuda" and not any(d.startswith("cuda") for d in devices):
            raise ConfigError(f"--device cuda, but the workers see no CUDA device "
                              f"(they see: {', '.join(devices) or 'nothing'})")
        servicer = GradprobeServicer(
            store, pool, pool.about, ServiceLimits(
                max_model_bytes=config.max_model_bytes, workers=config.workers,
                max_queue=config.max_queue, timeout_s=config.timeout_s or None,
                max_message_bytes=MAX_RECEIVE_BYTES, upload_idle_s=config.upload_idle_s,
                worker_memory_bytes=memory_mb << 20),
            version=version, default_device=config.device, auth_required=bool(config.token),
            replica=config.replica or f"{socket.gethostname()}:{port}", metrics=metrics)
        service_pb2_grpc.add_GradprobeServicer_to_server(servicer, server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
        if config.metrics_port is not None:
            endpoint = metrics.serve_http(config.host, config.metrics_port)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await pool.close()
        if endpoint is not None:
            endpoint.close()
        shutil.rmtree(scratch_root, ignore_errors=True)
        raise
    return RunningServer(server, pool, health, port, config, metrics, endpoint)


async def serve(config: ServeConfig, *, version: str,
                stop_event: asyncio.Event | None = None) -> None:
    """Run until `stop_event` is set (SIGTERM/SIGINT in `gradprobe serve`), then drain."""
    running = await start_server(config, version=version)
    about = running.pool.about
    log.info("gradprobe %s listening on %s (%d worker(s), tls=%s, auth=%s, device=%s, "
             "devices=%s)", version, running.address, config.workers,
             "mtls" if config.tls_client_ca else ("on" if config.tls_cert else "off"),
             "token" if config.token else "off", config.device,
             ",".join(d.name for d in about.devices) if about else "?")
    if running.metrics_port is not None:
        log.info("Prometheus metrics on http://%s:%d/metrics", config.host, running.metrics_port)
    log.info("workers confined by: %s (memory cap %s MB each)",
             ", ".join(about.confinement) if about and about.confinement else "nothing",
             running.pool.memory_mb)
    stop_event = stop_event or asyncio.Event()
    await stop_event.wait()
    log.info("shutting down: draining in-flight calls for up to %.0fs", config.grace_s)
    await running.stop()
    log.info("stopped")
