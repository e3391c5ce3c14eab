"""Lint many model files in one run: in parallel worker processes where cores and memory allow
and the work pays for starting them, results in input order, and a file that cannot be linted becomes one error entry instead of
ending the run.

Outcome of each file, and what the CLI makes of it (the convention of mature linters: a file
that cannot be read is a usage problem, not a finding):
- a report: its findings count towards exit code 1 as usual;
- `error` (bad or unsupported model file, bad input spec): one line on stderr, exit code 2;
- `internal` (a bug in gradprobe, or the worker process died — crash or out of memory):
  one line on stderr, exit code 3.
The other files are still linted and reported either way.

Workers are spawned (not forked: torch and fork do not mix), each with its share of the CPU
threads. On a GPU the models are linted one after another in this process: the device does
the parallel work and several processes would only compete for its memory."""

from __future__ import annotations

import os
import queue as queue_module
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from gradprobe.client.advice import cli_message
from gradprobe.client.progress import Progress
from gradprobe.diagnostics.errors import GradprobeError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report

# What one worker costs before it loads a model (python + torch + onnx + onnxruntime), and
# how many times its file size a model takes while probed (parameters, gradients, optimizer-
# free activations of one small batch, the interpreter's copies). Deliberately pessimistic:
# running out of memory loses a file, running a little slower loses nothing.
WORKER_BASE_BYTES = 700 * 2**20
MODEL_BYTES_FACTOR = 8
# Starting a worker costs seconds of CPU (importing torch); a small model lints in well under
# one. Unless asked for with --jobs, workers start only where they can pay that back.
PARALLEL_MIN_FILES = 8
PARALLEL_MIN_BYTES = 64 * 2**20


@dataclass
class LintOutcome:
    path: Path
    report: Report | None = None
    error: str | None = None  # one line for the user
    internal: bool = False  # the fault is gradprobe's, not the file's
    detail: str = ""  # traceback of an internal fault, for GRADPROBE_DEBUG

    @property
    def ok(self) -> bool:
        return self.report is not None


def lint_files(
    paths: Sequence[Path],
    options_for: Callable[[Path], DiagnoseOptions],
    *,
    jobs: int | None = None,
    progress: Progress | None = None,
    diagnose: Diagnose | None = None,
) -> list[LintOutcome]:
    """Lint every path; outcomes come back in the order of `paths`. `jobs` caps the worker
    count (None: as many as cores, files and memory allow; 1: in this process). `diagnose`
    replaces the local engine (e.g. gRPC servers do the work): then `jobs` files (default
    1) are in flight at once."""
    options = [options_for(path) for path in paths]  # configuration errors before any work
    if diagnose is not None:  # the servers do the work: only requests in flight here
        return _lint_remote(list(paths), options, max(1, min(jobs or 1, len(paths))),
                            progress, diagnose)
    workers = worker_count(paths, options, jobs)
    if workers <= 1:
        return [_lint_here(path, opts, progress, _diagnose) for path, opts in zip(paths, options)]
    return _lint_parallel(list(paths), options, workers, progress)


def _lint_remote(paths: list[Path], options: list[DiagnoseOptions], jobs: int,
                 progress: Progress | None, diagnose: Diagnose) -> list[LintOutcome]:
    """`jobs` requests in flight at once, from threads of this process (the calls wait on the
    network, not the CPU); outcomes in the order of `paths`."""
    if jobs == 1:
        return [_lint_here(path, opts, progress, diagnose) for path, opts in zip(paths, options)]
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="gradprobe-remote") as pool:
        return list(pool.map(lambda pair: _lint_here(*pair, progress, diagnose),
                             zip(paths, options)))


def worker_count(paths: Sequence[Path], options: Sequence[DiagnoseOptions],
                 jobs: int | None) -> int:
    if len(paths) <= 1 or (jobs is not None and jobs <= 1):
        return 1
    if _uses_gpu(options):
        return 1
    sizes = [model_bytes(path) for path in paths]
    if jobs is None and len(paths) < PARALLEL_MIN_FILES and sum(sizes) < PARALLEL_MIN_BYTES:
        return 1
    limit = min(os.cpu_count() or 1, len(paths), jobs or len(paths))
    available = available_memory()
    if available is not None:
        largest = max(sizes)
        per_worker = WORKER_BASE_BYTES + MODEL_BYTES_FACTOR * largest
        limit = min(limit, max(1, available // per_worker))
    return max(1, limit)


def model_bytes(path: Path) -> int:
    """A model's size on disk, with its ONNX external-data file when there is one."""
    total = 0
    for part in (path, path.with_name(path.name + ".data")):
        try:
            total += part.stat().st_size
        except OSError:
            pass
    return total


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _uses_gpu(options: Sequence[DiagnoseOptions]) -> bool:
    if all(opts.device == "cpu" for opts in options):
        return False
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- one file

Diagnose = Callable[[Path, DiagnoseOptions, Any], Report]  # (path, options, progress hook)


def _diagnose(path: Path, options: DiagnoseOptions, hook: Any) -> Report:
    from gradprobe.diagnostics.api import diagnose

    return diagnose(path, options, progress=hook, path_label=str(path))


def _lint_here(path: Path, options: DiagnoseOptions, progress: Progress | None,
               diagnose: Diagnose) -> LintOutcome:
    label = str(path)
    hook = progress.hook(label) if progress else None
    outcome = _attempt(path, options, hook, diagnose)
    if progress:
        progress.finished(label, _outcome_word(outcome))
    return outcome


def _attempt(path: Path, options: DiagnoseOptions, hook: Any,
             diagnose: Diagnose = _diagnose) -> LintOutcome:
    try:
        return LintOutcome(path, report=diagnose(path, options, hook))
    except GradprobeError as exc:
        return LintOutcome(path, error=cli_message(exc))
    except MemoryError:
        return LintOutcome(path, error="out of memory while probing this model "
                                       "(try a smaller --batch-size)", internal=True)
    except Exception as exc:  # a bug in gradprobe, or a server's answer: lint the other files
        remote = _remote_failure(exc)
        if remote is not None:
            line, internal = remote
            return LintOutcome(path, error=line, internal=internal)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return LintOutcome(path, error=f"internal error: {type(exc).__name__}: {first}",
                           internal=True, detail=traceback.format_exc())


def _remote_failure(exc: Exception) -> tuple[str, bool] | None:
    # Only a remote run can raise RemoteError; local runs never import grpc for this check.
    if type(exc).__name__ != "RemoteError":
        return None
    from gradprobe.client.remote import describe_remote_failure

    return describe_remote_failure(exc)


def _outcome_word(outcome: LintOutcome) -> str:
    if outcome.report is None:
        return "failed"
    s = outcome.report.summary
    return f"{s.error} error(s), {s.warning} warning(s), {s.info} info"


# ---------------------------------------------------------------- worker processes

_events: Any = None  # the worker's end of the progress queue


def _init_worker(events: Any, threads: int) -> None:
    global _events
    _events = events
    import torch

    torch.set_num_threads(threads)  # N workers x all cores each would thrash


def _lint_in_worker(index: int, path: str, options: dict) -> tuple[str, str, str]:
    """Runs in a worker. Returns (kind, payload, detail): the report as JSON, or the error."""
    def hook(stage: str, fraction: float) -> None:
        if _events is not None:
            _events.put((index, stage, fraction))

    outcome = _attempt(Path(path), DiagnoseOptions.model_validate(options), hook)
    if outcome.report is not None:
        return "report", outcome.report.to_json(indent=None), ""
    return ("internal" if outcome.internal else "error"), outcome.error or "", outcome.detail


Task = Callable[[int, str, dict], tuple[str, str, str]]


def _lint_parallel(paths: list[Path], options: list[DiagnoseOptions], workers: int,
                   progress: Progress | None, task: Task = _lint_in_worker) -> list[LintOutcome]:
    context = get_context("spawn")
    events = context.Queue()
    labels = [str(path) for path in paths]
    collector = threading.Thread(target=_forward_events, args=(events, labels, progress),
                                 daemon=True)
    collector.start()
    outcomes: dict[int, LintOutcome] = {}
    try:
        crashed = _run_pool(task, range(len(paths)), paths, options, workers, context,
                            events, outcomes, progress)
        # A worker that died took the pool down with it, and with it every file in flight.
        # Retry those one per fresh process, so the culprit alone is blamed.
        for index in sorted(crashed):
            if _run_pool(task, [index], paths, options, 1, context, events, outcomes, progress):
                outcomes[index] = LintOutcome(
                    paths[index], internal=True,
                    error="the worker process died while linting this file "
                          "(crash or out of memory)")
                if progress:
                    progress.finished(labels[index], "failed")
    finally:
        events.put(None)
        collector.join(timeout=5)
        events.close()
    return [outcomes[i] for i in range(len(paths))]


def _run_pool(task: Task, indices: Sequence[int], paths: list[Path],
              options: list[DiagnoseOptions], workers: int, context: Any, events: Any,
              outcomes: dict[int, LintOutcome], progress: Progress | None) -> list[int]:
    """Run `indices` on a pool; fill `outcomes`; return the indices lost to a broken pool."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    crashed: list[int] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=_init_worker, initargs=(events, threads)) as pool:
        futures: dict[Future, int] = {
            pool.submit(task, i, str(paths[i]), options[i].model_dump()): i for i in indices}
        for future in as_completed(futures):
            index = futures[future]
            try:
                kind, payload, detail = future.result()
            except BrokenProcessPool:
                crashed.append(index)
                continue
            if kind == "report":
                outcomes[index] = LintOutcome(paths[index],
                                              report=Report.model_validate_json(payload))
            else:
                outcomes[index] = LintOutcome(paths[index], error=payload,
                                              internal=kind == "internal", detail=detail)
            if progress:
                progress.finished(str(paths[index]), _outcome_word(outcomes[index]))
    return crashed


def _forward_events(events: Any, labels: list[str], progress: Progress | None) -> None:
    while True:
        try:
            event = events.get(timeout=0.5)
        except queue_module.Empty:
            continue
        except (EOFError, OSError):
            return
        if event is None:
            return
        index, stage, fraction = event
        if progress:
            progress.stage(labels[index], stage, fraction)
