"""gradprobe: lint a neural network at initialisation.

The public surface: `diagnose`, `fix`, `check`, `InitError`, `DiagnoseOptions`, `Report`,
`Finding`, `Severity`, `Client`.
Everything else is importable but not promised.

    import gradprobe
    report = gradprobe.diagnose("model.onnx")
    report = gradprobe.diagnose(model, batch)       # a live nn.Module, left as it was
    gradprobe.check(model, batch)                   # raises gradprobe.InitError on errors
    with gradprobe.Client("localhost:50051") as client:
        report = client.diagnose("model.onnx")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradprobe.diagnostics.errors import GradprobeError, InitError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Finding, Report, Severity

if TYPE_CHECKING:
    from gradprobe.client.api import Client
    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.live_repair import check
    from gradprobe.diagnostics.live_repair import fix_live as fix

__version__ = "0.1.0"

__all__ = ["Client", "DiagnoseOptions", "Finding", "GradprobeError", "InitError", "Report",
           "Severity", "__version__", "check", "diagnose", "fix"]


def __getattr__(name: str) -> Any:
    # The engine pulls in torch and the client pulls in grpc: load each only for users who ask
    # for it, so the server's main process, a client and a health check stay light.
    if name == "diagnose":
        from gradprobe.diagnostics.api import diagnose

        return diagnose
    if name in ("fix", "check"):
        from gradprobe.diagnostics import live_repair

        return live_repair.fix_live if name == "fix" else live_repair.check
    if name == "Client":
        from gradprobe.client.api import Client

        return Client
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
