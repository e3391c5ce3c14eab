"""Domain errors. Raised where the problem is found; mapped once per door
(exit code 2 in the CLI, a gRPC status in the server interceptor).

Every message is one line a user can act on: what is wrong, and where.
"""

from __future__ import annotations


class GradprobeError(Exception):
    """Base of every error caused by the user's input rather than by gradprobe itself."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, always

    @property
    def message(self) -> str:
        return str(self)


class ModelLoadError(GradprobeError):
    """The file is missing, unreadable, not a model, truncated or internally inconsistent."""


class UnsupportedOperator(GradprobeError):
    """The graph uses an operator (or an attribute of one) the interpreter does not implement."""

    def __init__(self, op_type: str, node: str, detail: str = "") -> None:
        # names come from the model file: bounded, so that a 100 KB operator name cannot
        # overflow a gRPC status (the message is all the caller would get)
        op_type, node, detail = _bounded(op_type), _bounded(node), _bounded(detail, 400)
        self.op_type = op_type
        self.node = node
        extra = f": {detail}" if detail else ""
        super().__init__(f"unsupported operator {op_type} at node '{node}'{extra}")


def _bounded(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class InputSpecError(GradprobeError):
    """Input shapes, dtypes or data do not fit the model's inputs."""


class ProbeError(GradprobeError):
    """The model loaded but could not be run forward/backward on the probe batch."""


class ConfigError(GradprobeError):
    """Bad configuration: unknown keys, bad values, unknown rule names."""


class InitError(GradprobeError):
    """`gradprobe.check`: the model's findings reach the severity that fails the check.
    `report` is the full report."""

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.report = report
