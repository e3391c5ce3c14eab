"""Errors raised by the service itself. Each maps to one gRPC status in interceptors.py;
errors caused by the user's input stay `GradprobeError`s (INVALID_ARGUMENT)."""

from __future__ import annotations

from gradprobe.diagnostics.errors import GradprobeError


class RequestError(GradprobeError):
    """The request itself is malformed (e.g. a sha256 that is not 64 hex digits)."""


class UploadError(RequestError):
    """The upload stream is malformed: bad metadata, wrong hash, too few or too many bytes."""


class ModelTooLarge(Exception):
    """The declared (or received) model size is above --max-model-mb."""


class ModelNotFound(Exception):
    """Diagnose named a sha256 the store does not hold: upload it first."""


class QueueFull(Exception):
    """Every worker is busy and --max-queue requests are already waiting."""


class WorkerCrashed(Exception):
    """The worker process died while probing (killed, out of memory, a crash in native code)."""


class WorkerOutOfMemory(Exception):
    """The probe needs (or would need) more than --worker-memory-mb."""


class ProbeTimedOut(Exception):
    """The probe ran past --timeout-s or the client's deadline; its worker was replaced."""


class StoreFull(Exception):
    """The store's quota (--store-max-gb) is reached and nothing in it can be evicted."""


class UploadsBusy(Exception):
    """--max-uploads uploads are already receiving data."""


class UploadStalled(Exception):
    """No upload message arrived for --upload-idle-s: the upload was cancelled and cleaned."""


class ShuttingDown(Exception):
    """The server is draining after SIGTERM and accepts no new probes."""
