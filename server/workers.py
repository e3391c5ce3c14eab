"""A pool of worker processes that run probes, seen from the server's event loop.

Why processes: a model that crashes the loader, or torch aborting in native code, must not take
the server down, and a probe cannot be stopped mid-operator any other way than by ending its
process. So: a worker that dies fails its request with WorkerCrashed and is replaced; a request
that is cancelled, or runs past its time, has its worker killed and replaced.

Each worker has one reader thread that owns the parent's end of its pipe: it reads every
message, hands it to the event loop, and on end-of-file reaps the process and closes the pipe.
The event loop only sends jobs and kills processes, so no file descriptor is ever closed under
a reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.reduction import send_handle
from dataclasses import dataclass

from gradprobe.diagnostics.report import Report
from gradprobe.server.convert import rebuild_error
from gradprobe.server.errors import (
    ModelNotFound,
    ProbeTimedOut,
    QueueFull,
    ShuttingDown,
    WorkerCrashed,
    WorkerOutOfMemory,
)
from gradprobe.server.metrics import ServerMetrics
from gradprobe.server.worker_limits import available_cpus
from gradprobe.server.worker_process import About, Job, WorkerSettings, worker_main

log = logging.getLogger("gradprobe.server")

Progress = Callable[[str, float], None]

# Delay before replacing a worker that died before it was ready (a broken install would
# otherwise respawn in a tight loop).
_RESPAWN_BACKOFF_S = 2.0
# How often busy workers' resident memory is compared with --worker-memory-mb.
_MEMORY_POLL_S = 0.5


class WorkerFault(Exception):
    """The engine raised something that is not a GradprobeError: a fault of gradprobe."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Running:
    future: asyncio.Future
    progress: Progress


class Worker:
    """One worker process plus the reader thread for its pipe."""

    def __init__(self, pool: WorkerPool, describe: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pool = pool
        self.conn, child = ctx.Pipe(duplex=True)
        # The worker watches `lifeline` for end-of-file: only this process holds the other
        # end, so it closes when the server dies, however it dies.
        lifeline, self._lifeline = ctx.Pipe(duplex=False)
        settings = WorkerSettings(threads=pool.threads, parent_pid=os.getpid(),
                                  memory_mb=pool.memory_mb, scratch_root=pool.scratch_root,
                                  store_dir=pool.store_dir, sandbox=pool.sandbox,
                                  user=pool.user)
        self.process = ctx.Process(target=worker_main,
                                   args=(child, settings, describe, lifeline),
                                   name="gradprobe-worker", daemon=True)
        self.process.start()
        child.close()  # else end-of-file never comes when the worker dies
        lifeline.close()
        self.pid = self.process.pid
        self.ready: asyncio.Future = pool.loop.create_future()
        self.running: _Running | None = None
        self.dead = False
        self.over_memory = False  # killed by the memory watchdog
        self.reader = threading.Thread(target=self._read, name=f"gradprobe-pipe-{self.pid}",
                                       daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            self._deliver(message)
        self.process.join()
        code = self.process.exitcode
        self.conn.close()
        self._lifeline.close()
        self._deliver(("died", code))

    def _deliver(self, message: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone
            self.pool.loop.call_soon_threadsafe(self.pool.on_message, self, message)

    def send(self, job: Job | None) -> None:
        if job is None:
            self.conn.send(None)
            return
        # The model goes as an open descriptor: a confined worker cannot open the store.
        model = os.open(job.model_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.conn.send(job)
            send_handle(self.conn, model, self.pid)
        finally:
            os.close(model)

    def kill(self) -> None:
        self.dead = True
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class WorkerPool:
    def __init__(self, size: int, max_queue: int, *, threads_per_worker: int | None = None,
                 start_timeout_s: float = 300.0, memory_mb: int | None = None,
                 scratch_root: str | None = None, store_dir: str | None = None,
                 sandbox: bool = True, user: str | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one worker")
        self.size = size
        self.metrics = metrics or ServerMetrics()
        self.memory_mb = memory_mb
        self.scratch_root = scratch_root
        self.store_dir = store_dir
        self.sandbox = sandbox
        self.user = user
        self.max_queue = max_queue
        self.threads = threads_per_worker or max(1, available_cpus() // size)
        self.start_timeout_s = start_timeout_s
        self.about: About | None = None
        self.loop: asyncio.AbstractEventLoop
        self._idle: asyncio.Queue[Worker]
        self._workers: set[Worker] = set()
        self._waiting = 0
        self._closing = False  # no new jobs, no new workers
        self._draining = False  # jobs already admitted finish; dead workers are not replaced

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._idle = asyncio.Queue()
        first = [self._spawn(describe=(i == 0)) for i in range(self.size)]
        try:
            ready = await asyncio.wait_for(asyncio.gather(*(w.ready for w in first)),
                                           self.start_timeout_s)
        except BaseException:
            await self.close()
            raise
        self.about = ready[0]
        if self.memory_mb:
            self._watchdog = self.loop.create_task(self._watch_memory())

    async def _watch_memory(self) -> None:
        """Second memory wall, for what RLIMIT_DATA does not see (CUDA workers run without
        it, native libraries that map memory themselves): a busy worker whose resident memory
        passes --worker-memory-mb is killed, and its request gets RESOURCE_EXHAUSTED."""
        limit = self.memory_mb << 20
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._closing:
            await asyncio.sleep(_MEMORY_POLL_S)
            for worker in list(self._workers):
                if worker.running is None or worker.dead:
                    continue
                try:
                    with open(f"/proc/{worker.pid}/statm") as statm:
                        resident = int(statm.read().split()[1]) * page
                except (OSError, ValueError, IndexError):
                    continue  # gone, or no /proc: RLIMIT_DATA is the only wall
                if resident > limit:
                    log.warning("worker %d uses %d MB, over --worker-memory-mb %d: killed",
                                worker.pid, resident >> 20, self.memory_mb)
                    worker.over_memory = True
                    worker.kill()

    def _spawn(self, describe: bool = False) -> Worker:
        worker = Worker(self, describe)
        self._workers.add(worker)
        return worker

    def _replace(self, worker: Worker) -> None:
        """Kill `worker` (if it still runs) and start another in its place."""
        worker.kill()
        worker.running = None
        if worker in self._workers:
            self._workers.discard(worker)
            if not (self._closing or self._draining):
                self._spawn()
                self.metrics.worker_restarts.inc()

    def drain(self) -> None:
        """Shutdown has begun: let admitted jobs finish, but start no replacement workers."""
        self._draining = True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker: politely (end of jobs) then, after `timeout_s`, by SIGKILL."""
        self._closing = True
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.cancel()
        workers = list(self._workers)
        for worker in workers:
            if worker.running is not None:
                worker.kill()
            else:
                try:
                    worker.send(None)
                except OSError:
                    worker.kill()
        # Poll rather than join in a thread: close() also runs at interpreter exit, when no
        # new threads may start.
        deadline = self.loop.time() + timeout_s
        while any(w.reader.is_alive() for w in workers) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for worker in workers:
            if worker.reader.is_alive():
                worker.kill()
        while any(w.reader.is_alive() for w in workers) and self.loop.time() < deadline + 5:
            await asyncio.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if not w.dead]

    def busy_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.running is not None]

    @property
    def waiting(self) -> int:
        """Jobs queued for a free worker."""
        return self._waiting

    # --- messages from the reader threads, on the loop ----------------------------------------

    def on_message(self, worker: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            if not worker.ready.done():
                worker.ready.set_result(message[1])
            if not self._closing and not worker.dead:
                self._idle.put_nowait(worker)
        elif kind == "progress":
            if worker.running is not None:
                worker.running.progress(message[1], message[2])
        elif kind == "died":
            self._on_death(worker, message[1])
        elif worker.running is not None and not worker.running.future.done():
            worker.running.future.set_result(message)

    def _on_death(self, worker: Worker, code: int | None) -> None:
        was_killed_by_us = worker.dead
        worker.dead = True
        running, worker.running = worker.running, None
        if running is not None and not running.future.done():
            running.future.set_exception(WorkerCrashed(describe_exit(code)))
        if not worker.ready.done():
            worker.ready.set_exception(
                RuntimeError(f"worker {worker.pid} failed to start ({describe_exit(code)})"))
            worker.ready.exception()  # retrieved: only start() waits on it, and may not
            if not self._closing:
                log.error("worker %d failed to start (%s); retrying in %.0fs", worker.pid,
                          describe_exit(code), _RESPAWN_BACKOFF_S)
                self._workers.discard(worker)
                self.loop.call_later(_RESPAWN_BACKOFF_S, self._respawn_if_short)
            return
        if not was_killed_by_us and not self._closing:
            log.warning("worker %d died (%s); starting a new one", worker.pid,
                        describe_exit(code))
        self._replace(worker)

    def _respawn_if_short(self) -> None:
        if not (self._closing or self._draining) and len(self._workers) < self.size:
            self._spawn()
            self.metrics.worker_restarts.inc()

    # --- running a job ------------------------------------------------------------------------

    async def _acquire(self, progress: Progress) -> Worker:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._waiting == 0:
            while not self._idle.empty():
                worker = self._idle.get_nowait()
                if not worker.dead:
                    return worker
        if self._waiting >= self.max_queue:
            raise QueueFull(
                f"server busy: {self.size} worker(s) probing and {self._waiting} request(s) "
                f"waiting (--max-queue {self.max_queue}); retry later")
        self._waiting += 1
        progress("queued", 0.0)
        try:
            while True:
                worker = await self._idle.get()
                if not worker.dead:
                    return worker
        finally:
            self._waiting -= 1

    async def run(self, job: Job, *, timeout_s: float | None, progress: Progress) -> Report:
        """Probe `job` on the next free worker. Raises the job's GradprobeError, QueueFull,
        WorkerCrashed, ProbeTimedOut, ShuttingDown; a cancelled caller kills the worker."""
        queued_at = self.loop.time()
        worker = await self._acquire(progress)
        self.metrics.observe_stage("queue", self.loop.time() - queued_at)
        future = self.loop.create_future()
        worker.running = _Running(future, progress)
        try:
            worker.send(job)
        except FileNotFoundError:  # evicted from the store: nothing was sent
            worker.running = None
            self._idle.put_nowait(worker)
            raise ModelNotFound(f"model {job.sha256} is no longer in the store: upload it "
                                "again") from None
        except OSError:  # the pipe broke: the worker is gone
            self._replace(worker)
            raise WorkerCrashed(f"worker crashed while probing {job.sha256}") from None
        try:
            result = await asyncio.wait_for(future, timeout_s)
        except WorkerCrashed as exc:  # the pool has replaced it already
            if worker.over_memory:
                raise WorkerOutOfMemory("the probe ran out of the worker's memory "
                                        "(--worker-memory-mb)") from None
            raise WorkerCrashed(f"worker crashed while probing {job.sha256} ({exc})") from None
        except asyncio.TimeoutError:
            self._replace(worker)
            raise ProbeTimedOut(
                f"probe of {job.sha256} ran past the server's limit of {timeout_s:g}s "
                "(--timeout-s); it was stopped") from None
        except BaseException:  # cancelled: the client went away or its deadline passed
            self._replace(worker)
            raise
        worker.running = None
        if self._closing or result[0] == "memory":  # that worker exits; start another
            self._replace(worker)
        elif not worker.dead:
            self._idle.put_nowait(worker)
        return _unpack(result)


def _unpack(result: tuple) -> Report:
    kind = result[0]
    if kind == "report":
        return result[1]
    if kind == "error":
        raise rebuild_error(result[1], result[2])
    if kind == "memory":
        raise WorkerOutOfMemory(result[1])
    raise WorkerFault(str(result[1]))
