"""A probe for container health checks: asks a gradprobe server's standard gRPC health service
whether it is SERVING. Exit 0 if it is, 1 otherwise. Needs no token (health stays open).

    python -m gradprobe.server.healthcheck --address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, *, service: str = "", timeout_s: float = 3.0,
          tls_ca: Path | None = None, tls_server_name: str | None = None) -> str:
    """The server's health status name ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE"."""
    if tls_ca is not None:
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(tls_ca.read_bytes()), options)
    else:
        channel = grpc.insecure_channel(address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        channel.close()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by the Kubernetes manifests' test: exec probes use it)."""
    parser = argparse.ArgumentParser(prog="python -m gradprobe.server.healthcheck",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca", type=Path, help="CA bundle when the server uses TLS")
    parser.add_argument("--tls-server-name", help="name on the server's certificate, when it "
                                                  "is not the address's host")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = check(args.address, service=args.service, timeout_s=args.timeout,
                   tls_ca=args.tls_ca, tls_server_name=args.tls_server_name)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
