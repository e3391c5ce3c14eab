"""A one-line progress display on stderr while models are linted: which model, which stage,
how many are done. It draws only on an interactive terminal; when stderr is a file, a pipe or a
CI log (CI=true) it prints nothing, so logs and captured output stay clean."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

_CLEAR_LINE = "\r\x1b[2K"


def wanted(stream: TextIO) -> bool:
    """Progress is for people watching a terminal, never for logs."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Per-model, per-stage progress for `total` models. Thread-safe: events of models linted
    in parallel arrive from a collector thread."""

    def __init__(self, total: int, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = wanted(self.stream) if enabled is None else enabled
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self._shown = False

    def stage(self, model: str, stage: str, fraction: float) -> None:
        """Called by the engine's progress hook: stage is load/probe/rules, fraction 0..1."""
        with self._lock:
            start = self._started.setdefault(model, time.monotonic())
            elapsed = time.monotonic() - start
            self._draw(model, f"{stage} {fraction:.0%} ({elapsed:.1f}s)")

    def finished(self, model: str, outcome: str) -> None:
        """One model is done; `outcome` is a short word or count summary."""
        with self._lock:
            self.done += 1
            self._started.pop(model, None)
            self._draw(model, outcome)

    def close(self) -> None:
        with self._lock:
            if self.enabled and self._shown:
                self.stream.write(_CLEAR_LINE)
                self.stream.flush()
            self._shown = False

    def hook(self, model: str):  # noqa: ANN201 - returns the engine's Progress callable
        """The callable `diagnose(progress=...)` wants, bound to one model."""
        return lambda stage, fraction: self.stage(model, stage, fraction)

    def _draw(self, model: str, status: str) -> None:
        if not self.enabled:
            return
        prefix, suffix = f"[{self.done}/{self.total}] ", f": {status}"
        room = _terminal_width() - 1 - len(prefix) - len(suffix)
        if len(model) > room:  # keep the file name, drop leading directories
            model = "…" + model[len(model) - max(room - 1, 8):]
        self.stream.write(_CLEAR_LINE + prefix + model + suffix)
        self.stream.flush()
        self._shown = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _terminal_width() -> int:
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return columns if columns >= 40 else 100  # 0 from a pseudo-terminal with no size
