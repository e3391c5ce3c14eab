"""Bounds on long-lived streams, so that no one caller can hold every slot of the server.

An idle stream costs a client nothing and the server a slot: hundreds of health `Watch` or
reflection streams opened without a token, or uploads that send their metadata and then wait,
used to exhaust the server-wide call limit (about 330), so that every call, health `Check`
included, was refused. Now:
- streams anyone may open (health Watch, reflection) have a cap of their own
  (`--max-open-streams`); over it, RESOURCE_EXHAUSTED at once, for those calls only;
- an upload ends when no message arrives for `--upload-idle-s`; it holds no file until its
  first byte, and uploads receiving bytes have their own cap (`--max-uploads`, store.py);
- the server-wide cap (`--max-calls`) sits well above both, so neither class can reach it;
- per connection, HTTP/2 bounds concurrent streams (`--streams-per-connection`; more wait on
  the client's side), keep-alive pings are enforced and connections are recycled
  (`channel_options`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from gradprobe.server.interceptors import _wrap

# Streams anyone may open (health needs no token; reflection too when no token is set).
OPEN_STREAM_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def channel_options(*, streams_per_connection: int, max_connection_age_s: float,
                    connection_age_grace_s: float) -> list[tuple[str, int]]:
    """grpc core settings for per-connection limits and keep-alive enforcement."""
    return [
        # streams one connection may have open at once; more wait on the client's side
        ("grpc.max_concurrent_streams", streams_per_connection),
        # ping idle clients, and drop those that do not answer
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # clients pinging more often than every 10 s are told off, then disconnected
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", 5 * 60_000),
        # connections are recycled; calls in flight get the grace period to finish
        ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(connection_age_grace_s * 1000)),
    ]


class StreamLimitInterceptor(aio.ServerInterceptor):
    """Caps the concurrent streams anyone may open (see the module's docstring). Placed after
    the auth interceptor: a call refused for its token never counts."""

    def __init__(self, *, max_open_streams: int) -> None:
        self.limits = {"open": max_open_streams}
        self.counts = {"open": 0}
        self._flags = {"open": "--max-open-streams"}

    @staticmethod
    def stream_class(method: str, handler: grpc.RpcMethodHandler) -> str | None:
        if method.startswith(OPEN_STREAM_PREFIXES) and (handler.request_streaming
                                                        or handler.response_streaming):
            return "open"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        kind = self.stream_class(handler_call_details.method, handler)
        if kind is None:
            return handler

        def around(behavior, request, context, streaming):
            if streaming:
                return self._stream(kind, behavior, request, context)
            return self._unary(kind, behavior, request, context)

        return _wrap(handler, around)

    async def _admit(self, kind: str, context: aio.ServicerContext) -> None:
        if self.counts[kind] >= self.limits[kind]:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open health-watch/reflection streams ({self.limits[kind]}, {self._flags[kind]}); "
                "retry later")
        self.counts[kind] += 1

    async def _unary(self, kind, behavior, request, context):
        await self._admit(kind, context)
        try:
            return await behavior(request, context)
        finally:
            self.counts[kind] -= 1

    async def _stream(self, kind, behavior, request, context):
        await self._admit(kind, context)
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):  # a handler that writes with context.write
                await result
            else:
                async for response in result:
                    yield response
        finally:
            self.counts[kind] -= 1
