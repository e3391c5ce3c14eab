"""Cross-cutting concerns of every gradprobe RPC, kept out of the servicer:

- `ErrorMapInterceptor`: the one place where exceptions become gRPC status codes, and where
  each call leaves its one log line (method, model sha, rules fired, duration, status).
- `AuthInterceptor`: bearer-token check; health stays open so that probes work without the
  token. Reflection (opt-in, `--reflection`) needs the token like any other call.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from gradprobe.diagnostics.errors import GradprobeError
from gradprobe.server.errors import (
    ModelNotFound,
    ModelTooLarge,
    ProbeTimedOut,
    QueueFull,
    ShuttingDown,
    StoreFull,
    UploadsBusy,
    UploadStalled,
    WorkerCrashed,
    WorkerOutOfMemory,
)
from gradprobe.server.metrics import ServerMetrics
from gradprobe.server.workers import WorkerFault

log = logging.getLogger("gradprobe.server.access")

SERVICE_PREFIX = "/gradprobe.v1.Gradprobe/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Longest status message sent; parts of a message may come from the model file.
MAX_MESSAGE_CHARS = 2000
# Trailing metadata that names the GradprobeError class, so a client can raise the same one.
ERROR_CLASS_KEY = "gradprobe-error-class"

# First match wins: subclasses before their bases.
STATUS_MAP: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ModelTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadsBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerOutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (GradprobeError, grpc.StatusCode.INVALID_ARGUMENT),
    (ProbeTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UploadStalled, grpc.StatusCode.DEADLINE_EXCEEDED),
    (WorkerCrashed, grpc.StatusCode.INTERNAL),
    (WorkerFault, grpc.StatusCode.INTERNAL),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
)

_call_notes: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "gradprobe_call_notes", default=None)


def annotate(**fields: Any) -> None:
    """Add fields (sha, rules, ...) to the current call's log line. No-op outside a call."""
    notes = _call_notes.get()
    if notes is not None:
        notes.update(fields)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for cls, code in STATUS_MAP:
        if isinstance(exc, cls):
            return code
    return None


def _format_line(method: str, code: grpc.StatusCode, duration_s: float,
                 notes: dict[str, Any]) -> str:
    parts = [f"rpc={method.rsplit('/', 1)[-1]}", f"status={code.name}",
             f"duration_ms={duration_s * 1000:.0f}"]
    for key, value in notes.items():
        if isinstance(value, list | tuple | set):
            value = ",".join(str(v) for v in value) or "-"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _wrap(handler: grpc.RpcMethodHandler,
          around: Callable[[Any, Any, aio.ServicerContext, bool], Any]) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose behaviour runs through `around`."""
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler

    if handler.response_streaming:
        async def wrapped(request_or_iterator, context):
            async for response in around(behavior, request_or_iterator, context, True):
                yield response
    else:
        async def wrapped(request_or_iterator, context):
            return await around(behavior, request_or_iterator, context, False)

    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class ErrorMapInterceptor(aio.ServerInterceptor):
    """Maps exceptions to status codes (STATUS_MAP; anything else is INTERNAL, logged with its
    traceback but never sent), logs one line per call and counts it in `metrics`."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler

        def around(behavior, request, context, streaming):
            if streaming:
                return self._stream(method, behavior, request, context)
            return self._unary(method, behavior, request, context)

        return _wrap(handler, around)

    async def _unary(self, method, behavior, request, context):
        async with _mapped_call(method, context, self._metrics):
            return await behavior(request, context)

    async def _stream(self, method, behavior, request, context):
        async with _mapped_call(method, context, self._metrics):
            async for response in behavior(request, context):
                yield response


@contextlib.asynccontextmanager
async def _mapped_call(method: str, context: aio.ServicerContext,
                       metrics: ServerMetrics | None):
    """One call's scope, for unary and streaming handlers alike: an exception becomes its
    status (aborting the call), and one log line is written whatever happens."""
    notes: dict[str, Any] = {}
    _call_notes.set(notes)
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except aio.AbortError:
        code = grpc.StatusCode.UNKNOWN  # the handler aborted itself (ours never do)
        raise
    except Exception as exc:
        code, message, trailer = _status(exc, method, notes)
        await context.abort(code, message, trailing_metadata=trailer)
    except BaseException:
        code = _cancel_code(context)
        raise
    finally:
        log.info(_format_line(method, code, time.perf_counter() - start, notes))
        if metrics is not None:
            metrics.count_call(method, code.name)


def _status(exc: Exception, method: str, notes: dict[str, Any]
            ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status code, one-line message and trailing metadata for `exc`."""
    code = status_for(exc)
    if code is None:
        log.error("internal error in %s", method, exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error in gradprobe (see the server log)", ()
    if isinstance(exc, WorkerFault):  # its text may quote the model's code: log it only
        log.error("internal error in %s: %s", method, exc)
        return code, "internal error in gradprobe (see the server log)", ()
    message = str(exc)
    if len(message) > MAX_MESSAGE_CHARS:  # gRPC metadata has a size limit; never lose a status
        message = message[:MAX_MESSAGE_CHARS] + "..."
    notes["error"] = repr(message[:200])
    if isinstance(exc, GradprobeError):
        return code, message, ((ERROR_CLASS_KEY, type(exc).__name__),)
    return code, message, ()


def _cancel_code(context: aio.ServicerContext) -> grpc.StatusCode:
    """Why a call was cancelled: its deadline passed, or the client (or shutdown) ended it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class AuthInterceptor(aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health."""

    def __init__(self, token: str, metrics: ServerMetrics | None = None) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_PREFIXES):
            return True
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        return hmac.compare_digest(given, self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        if self._allowed(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def around(behavior, request, context, streaming):
            async def deny():
                logging.getLogger("gradprobe.server.access").info(
                    _format_line(method, grpc.StatusCode.UNAUTHENTICATED, 0.0, {}))
                if self._metrics is not None:
                    self._metrics.count_call(method, grpc.StatusCode.UNAUTHENTICATED.name)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or invalid bearer token (authorization metadata)")

            if streaming:
                async def deny_stream():
                    await deny()
                    yield  # pragma: no cover  (abort raises)
                return deny_stream()
            return deny()

        return _wrap(handler, around)
