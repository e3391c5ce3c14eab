"""gradprobe: lint a neural network at initialisation.

The public surface: `diagnose`, `DiagnoseOptions`, `Report`, `Finding`, `Severity`, `Client`,
`GradprobeError`. Everything else is importable but not promised.

    import gradprobe
    report = gradprobe.diagnose("model.onnx")
    with gradprobe.Client("localhost:50051") as client:
        report = client.diagnose("model.onnx")
"""

import typing as _typing

from gradprobe.diagnostics.errors import GradprobeError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Finding, Report, Severity

if _typing.TYPE_CHECKING:
    from gradprobe.client.api import Client
    from gradprobe.diagnostics.api import diagnose

__version__ = "0.1.0"

__all__ = ["Client", "DiagnoseOptions", "Finding", "GradprobeError", "Report", "Severity",
           "__version__", "diagnose"]


def __getattr__(name: str) -> object:
    # The engine pulls in torch and the client pulls in grpc: load each only for users who ask
    # for it, so the server's main process, a client and a health check stay light.
    if name == "diagnose":
        from gradprobe.diagnostics.api import diagnose

        return diagnose
    if name == "Client":
        from gradprobe.client.api import Client

        return Client
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
