"""The Gradprobe servicer: translates requests into store/pool calls and results into
responses. Errors are raised, never caught here: interceptors.py maps them to status codes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from google.protobuf.message import Message

from gradprobe.server import convert
from gradprobe.server.errors import UploadError, UploadStalled, WorkerOutOfMemory
from gradprobe.server.interceptors import annotate
from gradprobe.server.metrics import ServerMetrics
from gradprobe.server.store import ModelStore, check_sha256
from gradprobe.server.worker_limits import estimate_input_bytes
from gradprobe.server.worker_process import About, Job
from gradprobe.server.workers import WorkerPool
from gradprobe.v1 import service_pb2 as spb
from gradprobe.v1 import service_pb2_grpc

CHUNK_BYTES = 1 << 20  # what clients should send per upload message


@dataclass(frozen=True)
class ServiceLimits:
    max_model_bytes: int
    workers: int
    max_queue: int
    timeout_s: float | None  # per probe; None: no limit
    max_message_bytes: int
    upload_idle_s: float = 30.0  # no upload message for this long: cancelled and cleaned
    worker_memory_bytes: int = 0  # 0: no limit


class GradprobeServicer(service_pb2_grpc.GradprobeServicer):
    def __init__(self, store: ModelStore, pool: WorkerPool, about: About, limits: ServiceLimits,
                 *, version: str, default_device: str, auth_required: bool,
                 replica: str = "", metrics: ServerMetrics | None = None) -> None:
        self.store = store
        self.replica = replica
        self.metrics = metrics or pool.metrics
        self.pool = pool
        self.limits = limits
        self.version = version
        self.default_device = default_device
        self.auth_required = auth_required
        self._rules = [spb.RuleDoc.FromString(doc) for doc in about.rules]
        self._devices = [spb.Device(name=d.name, description=d.description,
                                    memory_bytes=d.memory_bytes) for d in about.devices]

    async def HasModel(self, request: spb.HasModelRequest, context) -> spb.HasModelResponse:
        sha = check_sha256(request.sha256)
        annotate(sha=sha)
        path = self.store.find(sha)
        annotate(present=path is not None)
        if path is None:
            return spb.HasModelResponse(present=False)
        return spb.HasModelResponse(present=True, size_bytes=path.stat().st_size)

    async def UploadModel(self, request_iterator: AsyncIterator[spb.UploadModelRequest],
                          context) -> spb.UploadModelResponse:
        messages = request_iterator.__aiter__()
        idle_s = self.limits.upload_idle_s
        meta = await _opening(messages, idle_s, "metadata", "upload")
        annotate(sha=meta.sha256[:64], bytes=meta.size_bytes)
        header = self.store.check_header(meta.sha256, meta.size_bytes,
                                         convert.format_from_proto(meta.format))
        existing = self.store.find(header.sha256)
        if existing is not None:  # the client did not ask first; the chunks stay unread
            annotate(already_present=True)
            return spb.UploadModelResponse(sha256=header.sha256,
                                           size_bytes=existing.stat().st_size,
                                           already_present=True)
        await self.store.receive(header, _chunks(messages, idle_s, "chunk"))
        annotate(store_bytes=self.store.used_bytes)  # the store's size, in the access log
        return spb.UploadModelResponse(sha256=header.sha256, size_bytes=header.size_bytes)

    async def Lint(self, request_iterator: AsyncIterator[spb.LintRequest], context
                   ) -> AsyncIterator[spb.LintEvent]:
        messages = request_iterator.__aiter__()
        idle_s = self.limits.upload_idle_s
        start = await _opening(messages, idle_s, "start", "Lint")
        meta = start.model
        annotate(sha=meta.sha256[:64], bytes=meta.size_bytes)
        header = self.store.check_header(meta.sha256, meta.size_bytes,
                                         convert.format_from_proto(meta.format))
        options = convert.options_from_proto(start.options, default_device=self.default_device)
        self._check_memory(options)  # refused before a byte is uploaded
        with self.store.hold(header.sha256):  # a cached model stays until the job is done
            cached = self.store.find(header.sha256) is not None
            annotate(cached=cached)
            if not cached:
                yield spb.LintEvent(send_model=spb.SendModel(chunk_bytes=CHUNK_BYTES))
                await self.store.receive(header, _chunks(messages, idle_s, "chunk"))
            label = start.path_label if start.HasField("path_label") else None
            job = Job(sha256=header.sha256, model_path=str(self.store.path_of(header.sha256)),
                      options=options, path_label=label)
            annotate(replica=self.replica)
            yield spb.LintEvent(accepted=spb.Accepted(replica=self.replica, cached=cached))
            async for kind, message in self._run(job):
                yield spb.LintEvent(**{kind: message})

    async def Diagnose(self, request: spb.DiagnoseRequest, context
                       ) -> AsyncIterator[spb.DiagnoseEvent]:
        sha = check_sha256(request.sha256)
        annotate(sha=sha)
        path = self.store.path_of(sha)
        options = convert.options_from_proto(request.options, default_device=self.default_device)
        label = request.path_label if request.HasField("path_label") else None
        self._check_memory(options)
        job = Job(sha256=sha, model_path=str(path), options=options, path_label=label)
        async for kind, message in self._run(job):
            yield spb.DiagnoseEvent(**{kind: message})

    async def _run(self, job: Job) -> AsyncIterator[tuple[str, Message]]:
        """Probe `job` on the pool: ("progress", ...) events while it waits and runs, then
        ("finding", ...) for each finding and ("report", ...) last."""
        started = time.perf_counter()
        events: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
        probe = asyncio.ensure_future(self.pool.run(
            job, timeout_s=self.limits.timeout_s,
            progress=lambda stage, fraction: events.put_nowait((stage, fraction))))
        probe.add_done_callback(lambda _: events.put_nowait(None))
        try:
            with self.store.hold(job.sha256):  # not evicted while queued or probed
                while (event := await events.get()) is not None:
                    yield "progress", spb.Progress(stage=event[0], fraction=event[1])
            report = probe.result()
        finally:
            probe.cancel()  # no-op when done; else the pool kills the worker
        timing = report.timing
        for stage, seconds in (("load", timing.load_s), ("probe", timing.probe_s),
                               ("rules", timing.rules_s),
                               ("total", time.perf_counter() - started)):
            self.metrics.observe_stage(stage, seconds)
        annotate(rules=sorted({f.rule for f in report.findings}), findings=len(report.findings),
                 device=report.device)
        for finding in report.findings:
            yield "finding", convert.finding_to_proto(finding)
        yield "report", convert.report_to_proto(report, with_findings=False)

    def _check_memory(self, options) -> None:  # noqa: ANN001  (DiagnoseOptions)
        """Refuse before any work a probe whose inputs alone exceed a worker's memory."""
        limit = self.limits.worker_memory_bytes
        needed = estimate_input_bytes(options.input_shapes, options.input_dtypes)
        if limit and needed > limit:
            raise WorkerOutOfMemory(
                f"the probe batch alone needs about {needed >> 20} MB, over this server's "
                f"{limit >> 20} MB per worker (--worker-memory-mb)")

    async def ListRules(self, request: spb.ListRulesRequest, context) -> spb.ListRulesResponse:
        return spb.ListRulesResponse(rules=self._rules)

    async def GetServerInfo(self, request: spb.GetServerInfoRequest, context) -> spb.ServerInfo:
        limits = self.limits
        return spb.ServerInfo(
            version=self.version,
            devices=self._devices,
            default_device=self.default_device,
            auth_required=self.auth_required,
            limits=spb.Limits(
                max_model_bytes=limits.max_model_bytes, workers=limits.workers,
                max_queue=limits.max_queue, timeout_s=limits.timeout_s or 0.0,
                chunk_bytes=CHUNK_BYTES, max_message_bytes=limits.max_message_bytes,
            ),
        )


async def _next_message(messages: AsyncIterator[spb.UploadModelRequest | spb.LintRequest],
                        idle_s: float) -> spb.UploadModelRequest | spb.LintRequest:
    try:
        return await asyncio.wait_for(messages.__anext__(), idle_s)
    except asyncio.TimeoutError:
        raise UploadStalled(f"no upload message for {idle_s:g}s (--upload-idle-s): the upload "
                            "was cancelled") from None


async def _opening(messages: AsyncIterator[spb.UploadModelRequest | spb.LintRequest],
                   idle_s: float, field: str, call: str) -> Message:
    """The `field` part of a stream's first message, which must carry it."""
    try:
        first = await _next_message(messages, idle_s)
    except StopAsyncIteration:
        raise UploadError(f"empty {call} stream: the first message must carry the "
                          f"{field}") from None
    if first.WhichOneof("part") != field:
        raise UploadError(f"the first {call} message must carry the {field}, not a chunk")
    return getattr(first, field)


async def _chunks(messages: AsyncIterator[spb.UploadModelRequest | spb.LintRequest],
                  idle_s: float, field: str) -> AsyncIterator[bytes]:
    """The chunks of an upload, to the end of the client's stream (its half-close)."""
    while True:
        try:
            message = await _next_message(messages, idle_s)
        except StopAsyncIteration:
            return
        if message.WhichOneof("part") != field:
            raise UploadError("the metadata may only come in the first message")
        yield message.chunk

