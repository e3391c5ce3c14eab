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
                    tls_ca: Path | None, timeout_s: float | None) -> Report:
    with Client(server, token=token, tls_ca=tls_ca, timeout_s=timeout_s) as client:
        return client.diagnose(path, options, path_label=str(path))
