"""`gradprobe lint --server`: run the probe on a gradprobe server instead of locally.

The report is the one the local run would give for the same file, options and seed (the
server runs the same engine; the path shown is the one given here). A model the server
rejects raises the same GradprobeError as locally, so the CLI's exit codes match.
"""

from __future__ import annotations

from pathlib import Path

from gradprobe.client.api import Client, RemoteError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report

__all__ = ["RemoteError", "diagnose_remote"]


def diagnose_remote(path: Path, options: DiagnoseOptions, *, server: str, token: str | None,
                    tls_ca: Path | None, timeout_s: float | None,
                    client_cert: Path | None = None, client_key: Path | None = None) -> Report:
    with Client(server, token=token, tls_ca=tls_ca, client_cert=client_cert,
                client_key=client_key, timeout_s=timeout_s) as client:
        return client.diagnose(path, options, path_label=str(path))


# Statuses that mean "check --server, --token, the deadline or the server's load", not
# "gradprobe is broken".
CALLER_STATUSES = frozenset({"UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED",
                             "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED"})


def describe_remote_failure(exc: BaseException) -> tuple[str, bool] | None:
    """(one line for the user, whether the fault is internal) for a server's failure, None for
    any other exception."""
    if not isinstance(exc, RemoteError):
        return None
    status = exc.code.name if exc.code is not None else "UNKNOWN"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"server {status}: {detail}", status not in CALLER_STATUSES
