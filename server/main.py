"""`gradprobe serve`: the command line of the gRPC server.

The CLI (client/cli.py) mounts `add_serve_arguments` on its `serve` sub-command and calls
`serve_from_args`; `python -m gradprobe.server.main` runs the same thing stand-alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gradprobe.diagnostics.errors import ConfigError
from gradprobe.server.app import ServeConfig, default_store_dir, serve
from gradprobe.server.worker_limits import MIN_WORKER_MEMORY_MB

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 or :: for every interface)")
    parser.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes that run probes in parallel")
    parser.add_argument("--max-model-mb", type=float, default=512.0,
                        help="largest model file accepted for upload")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="probes that may wait for a worker; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="longest a probe may run (0: no limit)")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the bearer token clients must send")
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="CA bundle (PEM) for client certificates: enables mutual TLS")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device for probes that do not ask for one")
    parser.add_argument("--store-dir", type=Path, default=None,
                        help=f"where uploaded models are kept (default {default_store_dir()})")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="on SIGTERM, how long in-flight probes may finish")
    limits = parser.add_argument_group("stream and connection limits (docs/security.md)")
    limits.add_argument("--max-open-streams", type=int, default=128,
                        help="health Watch and reflection streams open at once (no token "
                             "needed for health); more get RESOURCE_EXHAUSTED")
    limits.add_argument("--max-uploads", type=int, default=64,
                        help="uploads receiving bytes at once (each holds a temp file); more "
                             "get RESOURCE_EXHAUSTED")
    limits.add_argument("--max-calls", type=int, default=2048,
                        help="concurrent calls of every kind, server-wide")
    limits.add_argument("--upload-idle-s", type=float, default=30.0,
                        help="an upload that sends nothing for this long is cancelled")
    limits.add_argument("--streams-per-connection", type=int, default=32,
                        help="concurrent streams one client connection may open")
    limits.add_argument("--max-connection-age-s", type=float, default=1800.0,
                        help="connections are closed (gracefully) after this long")
    limits.add_argument("--reflection", action="store_true",
                        help="enable gRPC server reflection (needs the token when one is set)")
    limits.add_argument("--worker-memory-mb", type=int, default=None,
                        help="memory cap of each worker (default: 3/4 of the memory this "
                             "server may use, the container's limit where there is one, shared "
                             "by the workers); over it, RESOURCE_EXHAUSTED")
    limits.add_argument("--store-max-gb", type=float, default=None,
                        help="disk quota of the model store, uploads in progress included; "
                             "least recently used models are evicted (default: no quota)")
    limits.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                        help="do not confine workers with Landlock/seccomp (docs/security.md)")
    limits.add_argument("--worker-user", default=None,
                        help="when started as root, workers switch to this user (e.g. nobody)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 or "
                             "absent: off)")
    parser.add_argument("--replica-name", default=None,
                        help="this replica's name in each job's Accepted event and the access "
                             "log (default: hostname:port)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.max_model_mb <= 0:
        raise ConfigError(f"--max-model-mb must be positive, got {args.max_model_mb}")
    for flag in ("max_open_streams", "max_uploads", "max_calls", "streams_per_connection"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, "
                              f"got {getattr(args, flag)}")
    for flag in ("upload_idle_s", "max_connection_age_s"):
        if not getattr(args, flag) > 0:  # NaN fails too
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, "
                              f"got {getattr(args, flag)}")
    if args.worker_memory_mb is not None and args.worker_memory_mb < MIN_WORKER_MEMORY_MB:
        raise ConfigError(f"--worker-memory-mb must be at least {MIN_WORKER_MEMORY_MB} (a worker "
                          f"needs that much for torch), got {args.worker_memory_mb}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port must be a port number, got {args.metrics_port}")
    if args.metrics_port and args.metrics_port == args.port:
        raise ConfigError(f"--metrics-port {args.metrics_port} is the gRPC --port")
    if args.store_max_gb is not None and not args.store_max_gb > 0:
        raise ConfigError(f"--store-max-gb must be positive, got {args.store_max_gb}")
    if args.worker_user is not None:
        import pwd

        try:
            pwd.getpwnam(args.worker_user)
        except KeyError:
            raise ConfigError(f"--worker-user {args.worker_user}: no such user") from None
        if os.geteuid() != 0:
            raise ConfigError("--worker-user needs the server to start as root")
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: "
                              f"{exc.strerror or exc}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
    return ServeConfig(
        host=args.host, port=args.port, workers=args.workers, max_model_mb=args.max_model_mb,
        max_queue=args.max_queue, timeout_s=args.timeout_s or None, token=token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        device=args.device, store_dir=args.store_dir, grace_s=args.grace_s,
        max_open_streams=args.max_open_streams, max_uploads=args.max_uploads,
        max_calls=args.max_calls, worker_memory_mb=args.worker_memory_mb,
        store_max_gb=args.store_max_gb, sandbox=args.sandbox, worker_user=args.worker_user,
        upload_idle_s=args.upload_idle_s, streams_per_connection=args.streams_per_connection,
        max_connection_age_s=args.max_connection_age_s, reflection=args.reflection,
        metrics_port=args.metrics_port or None, replica=args.replica_name,
    )


async def _serve_until_signalled(config: ServeConfig, version: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, version=version, stop_event=stop)


def serve_from_args(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean drain, 2 for bad settings."""
    from gradprobe import __version__

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        asyncio.run(_serve_until_signalled(config, __version__))
    except ConfigError as exc:
        print(f"gradprobe serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # e.g. the workers could not start
        print(f"gradprobe serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradprobe serve",
                                     description="Run the gradprobe gRPC service.")
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
