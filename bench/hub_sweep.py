"""The hub sweep: gradprobe on the models people actually train, at their libraries' default init.

What is measured. Every architecture of `timm.list_models()`, `torchvision.models.list_models()`
and every transformers model type that builds from its config shrunk to a tiny size
(`tests/library_zoo.py`) is built at the library's own init (never downloaded), exported the
ways users do (TorchScript trace, ONNX legacy `dynamo=False`, ONNX dynamo `dynamo=True`; eval
mode), and each file is linted with `gradprobe.diagnostics.diagnose`. Every model is healthy, so
**any warning or error is a false alarm**. One subprocess per model, killed at its time budget.

Each (library, model, export) ends in one status:
  linted          the engine produced a report (clean, or with false alarms)
  unsupported     exit-2 UnsupportedOperator: the op name is recorded
  lint-error      another exit-2 error (GradprobeError: the probe batch does not fit, ...)
  crashed         the engine raised something that is not a GradprobeError (exit 3 in the CLI)
  export-failed   the library's exporter failed, or wrote an ONNX file that gradprobe could not
                  lint and onnxruntime cannot run on the export's own example input either: not
                  gradprobe's doing, not counted against it (gradprobe's message is kept)
  build-failed / not-applicable / too-large   the harness could not or would not build it
  timeout         the model's budget ran out in this export (or before it)

How to read the scorecard: `lint rate` = linted / exported files (target >= 95%); `false
alarms` = linted files with at least one warning or error (target 0), per rule with the models
behind it and one example message.

    python bench/hub_sweep.py --sample 30 --export torchscript onnx_legacy --jobs 1
    python bench/hub_sweep.py --filter 'resnet|bert' --limit 10
    python bench/hub_sweep.py --sample 30 --export torchscript onnx_legacy --report-only

Results go to a JSON-lines file (`--results`); a rerun skips the (model, export) pairs already
there, so the sweep resumes after an interruption. Each result carries the linter version it was
produced by: a hash of the `diagnostics` code that the model's worker imported (wherever the
installed package points, which for an editable install is the checkout it was installed from,
not the folder this script runs in), without comments and docstrings. A worker whose code is
not the code the sweep started on is flagged in the log: do not change the linter under a
running sweep. The scorecard counts the files linted by an older version, and `--rerun-stale`
lints those again, so a sweep spread over days ends on one version. The
scorecard JSON (`--scorecard`) is what a script diffs; the markdown table replaces the section
between the hub-sweep markers in bench/README.md. The last line printed is `SWEEP {...}`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import library_zoo as zoo  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hub_sweep.jsonl"
SCORECARD = ROOT / "bench" / "scorecards" / "hub_sweep.json"  # committed: diff it
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- hub-sweep:begin -->", "<!-- hub-sweep:end -->"
LINTED, UNSUPPORTED, LINT_ERROR, CRASHED = "linted", "unsupported", "lint-error", "crashed"
EXPORT_FAILED, TIMEOUT = "export-failed", "timeout"
NOT_BUILT = ("build-failed", "not-applicable", "too-large")
PREFIX = "RESULT "
# Library defaults that are not an init to train from: the library sets them for loading
# pretrained weights. Findings on these are the linter being right, so the scorecard counts them
# apart from false alarms, and a clean file among them is a miss. Each entry says what is wrong
# and what a short training run measured (the figures in bench/README.md, "Hub sweep").
NOT_TRAINABLE_DEFAULTS: dict[tuple[str, str], str] = {
    ("transformers", "cpmant"): (
        "CpmAntConfig.init_std = 1.0 for every nn.Linear (CPM-Live scaled by 1/sqrt(fan_in) "
        "inside its Linear; transformers' port does not): 32x Xavier at the tiny width, 4096x "
        "at the real one. Causal LM, 150 AdamW steps: loss 14.6 -> 5.24 at the default, "
        "5.37 -> 3.83 at init_std 0.02"),
    ("transformers", "sam_vision_model"): (
        "SamVisionConfig.initializer_range = 1e-10: every weight ~1e-10, the output ~1e-4 of "
        "unit scale. 60 AdamW steps on an input-dependent target: loss 0.059 at the default, "
        "0.0059 at 0.02"),
    ("transformers", "sam_hq_vision_model"): (
        "SamHQVisionConfig.initializer_range = 1e-10, as sam_vision_model"),
}
# What the linter decides; the other statuses (not built, too large, the exporter failed) do not
# change with its version.
LINTER_STATUSES = (LINTED, UNSUPPORTED, LINT_ERROR, CRASHED, TIMEOUT)


# Generated from the rules' docstrings: what `gradprobe rule NAME` prints, not what it decides.
NOT_LINTER_CODE = {"_rule_catalog_data.py"}


def linter_version(root: Path | None = None) -> str:
    """A hash of the linter's code: two results with the same one came from the same code.
    Comments, formatting and docstrings do not count, so editing the rules' documentation in
    the middle of a sweep does not make its verdicts stale. `root` holds `diagnostics/`; by
    default the code `import gradprobe.diagnostics` loads, which an editable install maps to
    the checkout it was installed from, whatever folder the sweep runs in."""
    digest = hashlib.sha256()
    root = root or _imported_root()
    for path in _linter_files(root):
        code = _without_docstrings(ast.parse(path.read_bytes()))
        digest.update(path.relative_to(root).as_posix().encode() + b"\0"
                      + ast.dump(code).encode())
    return digest.hexdigest()[:12]


def _imported_root() -> Path:
    spec = importlib.util.find_spec("gradprobe.diagnostics")
    return Path(next(iter(spec.submodule_search_locations))).parent


def _linter_files(root: Path) -> list[Path]:
    return [p for p in sorted((root / "diagnostics").rglob("*.py"))
            if p.name not in NOT_LINTER_CODE]


def code_stamp(root: Path | None = None) -> str:
    """A digest of the linter's files' names, modification times and sizes: cheap enough to
    take before every result, to catch an edit that lands while a worker is linting (it
    imports modules as it needs them, so it could mix old and new code), and to tell a worker
    whether the sweep's version (a second of parsing) is still its own."""
    digest = hashlib.sha256()
    for p in _linter_files(root or _imported_root()):
        stat = p.stat()
        digest.update(f"{p}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
    return digest.hexdigest()[:12]


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def is_stale(row: dict, version: str) -> bool:
    return row["status"] in LINTER_STATUSES and row.get("linter") != version


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


# ---------------------------------------------------------------------------------------------
# Worker: one model, every requested export, one RESULT line per export as it finishes


def worker(library: str, name: str, exports: list[str], max_params: int,
           sweep_linter: tuple[str, str] | None = None) -> None:
    # What this process lints with, not what the sweep began on: the sweep's (version, stamp)
    # while the files are as they were then, else hashed again. A version no code has, when the
    # files changed while it ran: such a verdict is stale, and --rerun-stale redoes it.
    stamp = code_stamp()
    version = sweep_linter[0] if sweep_linter and sweep_linter[1] == stamp else linter_version()

    def emit(how: str, status: str, **extra: object) -> None:
        linter = version if code_stamp() == stamp else version + "+edited-while-linting"
        print(PREFIX + json.dumps({"library": library, "model": name, "export": how,
                                   "status": status, "linter": linter, **extra}), flush=True)

    start = time.perf_counter()
    params = zoo.parameters_on_meta(library, name)
    if params is not None and params > max_params:
        for how in exports:
            emit(how, "too-large", parameters=params, detail=f"{params:,} parameters")
        return
    try:
        built = zoo.build(library, name)
    except zoo.NotApplicable as exc:
        for how in exports:
            emit(how, "not-applicable", detail=str(exc))
        return
    except Exception as exc:
        for how in exports:
            emit(how, "build-failed", detail=one_line(exc))
        return
    if built.parameters > max_params:
        # It would not build on the meta device (torchvision's RegNets compute their widths
        # with tensors), so only the real build could count it.
        for how in exports:
            emit(how, "too-large", parameters=built.parameters,
                 detail=f"{built.parameters:,} parameters")
        return
    build_s = round(time.perf_counter() - start, 1)
    shapes = [list(t.shape) for t in built.inputs]
    with tempfile.TemporaryDirectory() as tmp:
        for how in exports:
            emit(how, **lint_one(built, how, Path(tmp)), parameters=built.parameters,
                 inputs=shapes, build_s=build_s)


def runtime_rejects(path: Path, inputs: list) -> str | None:
    """onnxruntime's one-line complaint when it cannot run the file on the input it was
    exported with (an exporter bug), else None. Asked only after gradprobe failed on the file,
    so that a failure counts against gradprobe unless the reference runtime fails too."""
    import onnxruntime

    try:
        quiet = onnxruntime.SessionOptions()
        quiet.log_severity_level = 4  # its complaint is returned, not printed
        session = onnxruntime.InferenceSession(str(path), quiet,
                                               providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=False)}
        session.run(None, feeds)
    except Exception as exc:
        return one_line(exc)[:200]
    return None


def lint_one(built: zoo.Built, how: str, directory: Path) -> dict:
    import torch

    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.errors import GradprobeError, UnsupportedOperator

    t0 = time.perf_counter()
    try:
        path = zoo.export(built, how, directory)
    except Exception as exc:
        return {"status": EXPORT_FAILED, "detail": one_line(exc)}
    t1 = time.perf_counter()
    options, retried = zoo.lint_options(built, how), {}
    try:
        try:
            report = diagnose(path, options)
        except GradprobeError as exc:
            if exc.hint is None or exc.hint.option != "input_file" or len(built.inputs) != 1:
                raise
            # The error asks for the input the model was exported with (a trace froze sizes
            # taken from its values: switch_transformers' tokens per expert): do as it says.
            example = directory / "export_input.pt"
            torch.save(built.inputs[0], example)
            retried = {"input": "export example", "first_error": str(exc)[:300]}
            report = diagnose(path, options.model_copy(update={"input_file": str(example)}))
    except UnsupportedOperator as exc:
        return {"status": UNSUPPORTED, "op": exc.op_type, "detail": str(exc)[:300]}
    except GradprobeError as exc:
        broken = runtime_rejects(path, built.inputs) if how != "torchscript" else None
        if broken is not None:  # the exporter's fault: onnxruntime cannot run the file either
            return {"status": EXPORT_FAILED, "detail": f"onnxruntime cannot run the exported "
                                                       f"file on its example input: {broken}",
                    "lint_detail": str(exc)[:300]}
        return {"status": LINT_ERROR, "detail": str(exc)[:300]}
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"status": CRASHED, "detail": one_line(exc),
                "where": f"{Path(where.filename).name}:{where.lineno}"}
    finally:
        for f in directory.iterdir():
            f.unlink()
    alarms = [{"rule": f.rule, "severity": f.severity.value, "layer": f.layer,
               "message": f.message[:400]}
              for f in report.findings if f.severity.value in ("error", "warning")]
    return {"status": LINTED, "alarms": alarms, **retried,
            "infos": sum(f.severity.value == "info" for f in report.findings),
            "notes": report.model.notes[:5], "export_s": round(t1 - t0, 1),
            "lint_s": round(time.perf_counter() - t1, 1)}


# ---------------------------------------------------------------------------------------------
# Choosing models


def sample_names(library: str, n: int, seed: int, pattern: re.Pattern | None) -> list[str]:
    """Deterministic stratified sample: families in a seeded order, one model each, round
    robin until n (so 30 timm models are 30 architectures, not 30 ResNet variants)."""
    family = {k: v for k, v in zoo.families(library).items() if not pattern or pattern.search(k)}
    groups: dict[str, list[str]] = defaultdict(list)
    for name, fam in sorted(family.items()):
        groups[fam].append(name)
    rng = random.Random(f"{seed}-{library}")
    order = sorted(groups)
    rng.shuffle(order)
    for fam in order:
        rng.shuffle(groups[fam])
    chosen: list[str] = []
    while len(chosen) < n and any(groups.values()):
        for fam in order:
            if groups[fam] and len(chosen) < n:
                chosen.append(groups[fam].pop())
    return chosen


def choose(args: argparse.Namespace) -> list[tuple[str, str]]:
    pattern = re.compile(args.filter) if args.filter else None
    todo = []
    for library in args.libraries:
        if args.sample:
            names = sample_names(library, args.sample, args.seed, pattern)
        else:
            names = [n for n in zoo.list_names(library) if not pattern or pattern.search(n)]
        todo += [(library, n) for n in names]
    return todo[: args.limit] if args.limit else todo


# ---------------------------------------------------------------------------------------------
# Parent: one subprocess per model, a time budget each, results appended as they come


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that entry runs again
    return rows


@dataclass
class WorkerRun:
    rows: list[dict]  # what the worker printed behind PREFIX
    elapsed: float
    timed_out: bool
    failure: str  # why the worker stopped early: the budget, or its exit code and stderr tail


def run_worker(cmd: list[str], threads: int, timeout: float) -> WorkerRun:
    """Run one worker subprocess under a time budget (its whole process group is killed when the
    budget runs out) and collect its result lines."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    rows: list[dict] = []
    stderr_tail: list[str] = []
    timer = threading.Timer(timeout, lambda: _kill(proc))
    timer.start()
    try:
        reader = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr.readlines()[-5:]))
        reader.start()
        for line in proc.stdout:
            if line.startswith(PREFIX):
                rows.append(json.loads(line[len(PREFIX):]))
        proc.wait()
        reader.join()
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - start
    timed_out = elapsed >= timeout - 0.5
    tail = " | ".join(s.strip() for s in stderr_tail if s.strip())[-300:]
    failure = (f"budget of {timeout:.0f} s ran out" if timed_out
               else f"worker died (exit {proc.returncode}): {tail}")
    return WorkerRun(rows, elapsed, timed_out, failure)


def run_model(library: str, name: str, exports: list[str], args: argparse.Namespace,
              linter: tuple[str, str]) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", library, name, "--export", *exports,
           "--max-params", str(args.max_params), "--sweep-linter", *linter]
    run = run_worker(cmd, args.threads, args.timeout)
    rows = run.rows
    done = {r["export"] for r in rows}
    for how in exports:
        if how not in done:
            rows.append({"library": library, "model": name, "export": how,
                         "status": TIMEOUT if run.timed_out else CRASHED, "detail": run.failure})
    for r in rows:
        r["model_s"] = round(run.elapsed, 1)
    return rows


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pending(models: list[tuple[str, str]], exports: list[str], rows: list[dict], version: str,
            rerun_stale: bool = False) -> list[tuple[str, str, list[str]]]:
    """The (library, model, exports) still to run: those without a result, and with
    `rerun_stale` those whose latest verdict came from another linter version."""
    latest = {(r["library"], r["model"], r["export"]): r for r in rows}
    done = {key for key, r in latest.items() if not (rerun_stale and is_stale(r, version))}
    todo = []
    for library, name in models:
        missing = [h for h in exports if (library, name, h) not in done]
        if missing:
            todo.append((library, name, missing))
    return todo


def sweep(args: argparse.Namespace) -> None:
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    version, stamp = linter_version(), code_stamp()
    rows = load_results(results_path)
    todo = pending(choose(args), args.export, rows, version, args.rerun_stale)
    done = len({(r["library"], r["model"], r["export"]) for r in rows})
    total, lock, counter = len(todo), threading.Lock(), [0]
    print(f"{total} model(s) to run, {done} (model, export) result(s) already in "
          f"{results_path}; linter {version}", flush=True)
    start = time.perf_counter()

    def one(item: tuple[str, str, list[str]]) -> None:
        rows = run_model(*item, args, (version, stamp))
        with lock:
            counter[0] += 1
            with results_path.open("a") as out:
                for r in rows:
                    r.setdefault("linter", version)  # a worker that died before it said
                    out.write(json.dumps(r) + "\n")
            left = (time.perf_counter() - start) / counter[0] * (total - counter[0])
            for r in rows:
                what = r["status"]
                if what == LINTED:
                    alarms = sorted({a["rule"] for a in r["alarms"]})
                    expected = (r["library"], r["model"]) in NOT_TRAINABLE_DEFAULTS
                    what = ("clean" + (" (MISSED: an untrainable default)" if expected else "")
                            if not alarms else ("flagged (an untrainable default) " if expected
                                                else "FALSE ALARM ") + ",".join(alarms))
                elif r.get("detail"):
                    what += ": " + r["detail"][:90]
                if r["linter"] != version:
                    what += f" [linted by {r['linter']}, not {version}: the code changed]"
                print(f"[{counter[0]}/{total} ~{left / 60:.0f} min left] {r['library']}/"
                      f"{r['model']} {r['export']}: {what} ({r['model_s']} s)", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))


# ---------------------------------------------------------------------------------------------
# Scorecard


def scorecard(rows: list[dict], models: set[tuple[str, str]] | None = None,
              exports: list[str] | None = None, version: str | None = None) -> dict:
    """Counts per library and export, false alarms per rule with the models behind each, and
    how many of the linter's verdicts came from an older version than `version`."""
    if models is not None:
        rows = [r for r in rows if (r["library"], r["model"]) in models]
    if exports is not None:
        rows = [r for r in rows if r["export"] in exports]
    latest: dict[tuple[str, str, str], dict] = {}
    for r in rows:  # a rerun of the same entry supersedes the earlier one
        latest[(r["library"], r["model"], r["export"])] = r
    rows = sorted(latest.values(), key=lambda r: (r["library"], r["model"], r["export"]))
    per: dict[str, dict] = {}
    for r in rows:
        for key in (r["library"], f"{r['library']}/{r['export']}", "all"):
            c = per.setdefault(key, defaultdict(int))
            c["files"] += 1
            c[r["status"]] += 1
            if r["status"] not in NOT_BUILT:
                c["built"] += 1
            if r["status"] not in (*NOT_BUILT, EXPORT_FAILED):  # a timeout counts against us
                c["exported"] += 1
            if r["status"] == LINTED:
                if (r["library"], r["model"]) in NOT_TRAINABLE_DEFAULTS:
                    c["flagged_untrainable_default" if r["alarms"] else "missed"] += 1
                else:
                    c["clean" if not r["alarms"] else "false_alarm_files"] += 1
    models_per = defaultdict(set)
    for r in rows:
        models_per[r["library"]].add(r["model"])
    counts = {}
    for key, c in sorted(per.items()):
        c = dict(c)
        c.setdefault("linted", 0)
        c["lint_rate"] = round(c["linted"] / c["exported"], 3) if c.get("exported") else None
        if "/" not in key:
            c["models"] = (len(models_per[key]) if key != "all"
                           else sum(len(v) for v in models_per.values()))
        counts[key] = c
    rules: dict[str, dict] = {}
    for r in rows:
        if r["status"] != LINTED or (r["library"], r["model"]) in NOT_TRAINABLE_DEFAULTS:
            continue
        for a in r["alarms"]:
            entry = rules.setdefault(a["rule"], {"files": set(), "findings": 0, "severity": set(),
                                                 "example": None})
            entry["files"].add(f"{r['library']}/{r['model']}:{r['export']}")
            entry["findings"] += 1
            entry["severity"].add(a["severity"])
            if entry["example"] is None:
                entry["example"] = (f"{r['library']}/{r['model']}:{r['export']} "
                                    f"{a['layer']}: {a['message']}")
    false_alarms = {rule: {"files": len(e["files"]), "findings": e["findings"],
                           "severity": sorted(e["severity"]), "models": sorted(e["files"]),
                           "example": e["example"]}
                    for rule, e in sorted(rules.items(), key=lambda kv: -len(kv[1]["files"]))}

    def listed(status: str) -> list[dict]:
        return [{"model": f"{r['library']}/{r['model']}:{r['export']}",
                 **({"op": r["op"]} if "op" in r else {}), "detail": r.get("detail", "")}
                for r in rows if r["status"] == status]

    ops: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] == UNSUPPORTED:
            ops[r["op"]].append(f"{r['library']}/{r['model']}:{r['export']}")
    seconds = {}
    for r in rows:
        seconds[(r["library"], r["model"])] = r.get("model_s", 0)
    versions: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["status"] in LINTER_STATUSES:
            versions[r.get("linter") or "unrecorded"] += 1
    linter = {"current": version, "files": dict(versions),
              "stale": sum(1 for r in rows if version and is_stale(r, version))}
    untrainable = [{"model": f"{r['library']}/{r['model']}:{r['export']}",
                    "flagged": bool(r["alarms"]),
                    "rules": sorted({a["rule"] for a in r["alarms"]}),
                    "why": NOT_TRAINABLE_DEFAULTS[(r["library"], r["model"])]}
                   for r in rows if r["status"] == LINTED
                   and (r["library"], r["model"]) in NOT_TRAINABLE_DEFAULTS]
    return {"schema": "gradprobe.hub-sweep/v1", "counts": counts, "false_alarms": false_alarms,
            "untrainable_defaults": untrainable, "linter": linter,
            "unsupported_ops": dict(sorted(ops.items())), "crashed": listed(CRASHED),
            "lint_errors": listed(LINT_ERROR), "timeouts": listed(TIMEOUT),
            "linted_with_export_input": [
                {"model": f"{r['library']}/{r['model']}:{r['export']}",
                 "detail": r.get("first_error", "")}
                for r in rows if r["status"] == LINTED and r.get("input") == "export example"],
            "export_failed": listed(EXPORT_FAILED), "build_failed": listed("build-failed"),
            "model_seconds": round(sum(seconds.values()), 1)}


def markdown(card: dict, meta: dict) -> str:
    lines = [BEGIN, "", "### Hub sweep: latest scorecard", "",
             f"Run: {meta['date']}; {meta['how']}. Total model time {card['model_seconds'] / 60:.0f} min "
             "(noisy: a shared machine). Every model is healthy: any warning or error is a false "
             "alarm.", "",
             "| library / export | models | files | built | exported | linted | lint rate | clean "
             "| with false alarms | untrainable default flagged / missed | unsupported "
             "| lint-error | crashed | timeout | export-failed | not built |", "|" + "---|" * 16]
    for key, c in card["counts"].items():
        rate = "" if c["lint_rate"] is None else f"{c['lint_rate']:.0%}"
        not_built = sum(c.get(s, 0) for s in NOT_BUILT)
        lines.append(f"| {key} | {c.get('models', '')} | {c['files']} | {c.get('built', 0)} | "
                     f"{c.get('exported', 0)} | {c['linted']} | {rate} | {c.get('clean', 0)} | "
                     f"{c.get('false_alarm_files', 0)} | "
                     f"{c.get('flagged_untrainable_default', 0)} / {c.get('missed', 0)} | "
                     f"{c.get(UNSUPPORTED, 0)} | "
                     f"{c.get(LINT_ERROR, 0)} | {c.get(CRASHED, 0)} | {c.get(TIMEOUT, 0)} | "
                     f"{c.get(EXPORT_FAILED, 0)} | {not_built} |")
    linter = card.get("linter", {})
    if linter.get("current"):
        older = ", ".join(f"{v}: {n}" for v, n in linter["files"].items()
                          if v != linter["current"])
        lines += ["", f"Linter version {linter['current']} (a hash of `diagnostics/`): "
                  + ("every verdict above is from it." if not linter["stale"] else
                     f"{linter['stale']} of the verdicts above come from older versions "
                     f"({older}); `--rerun-stale` lints them again.")]
    lines += ["", "False alarms per rule (files; first models; one example):", ""]
    if not card["false_alarms"]:
        lines.append("none")
    for rule, e in card["false_alarms"].items():
        shown = ", ".join(e["models"][:12]) + (" ..." if len(e["models"]) > 12 else "")
        lines.append(f"- **{rule}** ({'/'.join(e['severity'])}): {e['files']} files — {shown}. "
                     f"Example: `{e['example'][:300]}`")
    untrainable = card.get("untrainable_defaults", [])
    if untrainable:
        lines += ["", "Library defaults that are not an init to train from (findings expected; "
                  "a clean file is a miss):", ""]
        for u in untrainable:
            verdict = f"flagged ({', '.join(u['rules'])})" if u["flagged"] else "**missed**"
            lines.append(f"- {u['model']}: {verdict}. {u['why']}.")
    lines += ["", "Unsupported operators: " + (", ".join(
        f"{op} ({len(m)}: {', '.join(m[:4])}{' ...' if len(m) > 4 else ''})"
        for op, m in card["unsupported_ops"].items()) or "none") + "."]
    for title, key in (("Engine crashes", "crashed"), ("Other exit-2 errors", "lint_errors"),
                       ("Timeouts", "timeouts"),
                       ("Linted with the input they were exported with, as their first error "
                        "asked (a trace froze sizes from its values)", "linted_with_export_input")):
        items = card.get(key, [])
        lines.append(f"{title}: " + ("none." if not items else "; ".join(
            f"{i['model']} ({i['detail'][:160]})" for i in items[:15])
            + (" ..." if len(items) > 15 else "") + "."))
    lines += ["", END]
    return "\n".join(lines)


def write_readme(section: str, readme: Path, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between the markers (or append it), so reruns replace it."""
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", nargs="+", choices=zoo.LIBRARIES, default=list(zoo.LIBRARIES))
    parser.add_argument("--export", nargs="+", choices=zoo.EXPORTS, default=list(zoo.EXPORTS))
    parser.add_argument("--jobs", type=int, default=1, help="models linted at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model")
    parser.add_argument("--limit", type=int, help="at most this many models in all")
    parser.add_argument("--filter", help="regular expression on model names")
    parser.add_argument("--sample", type=int, help="N models per library, stratified by family")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--max-params", type=int, default=60_000_000,
                        help="skip models larger than this (counted on the meta device)")
    parser.add_argument("--results", default=str(RESULTS), help="JSON-lines results (resumable)")
    parser.add_argument("--scorecard", default=str(SCORECARD), help="scorecard JSON to write")
    parser.add_argument("--readme", default=str(README), help="markdown file to update")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild the scorecard of the selected models from the results")
    parser.add_argument("--all", action="store_true", help="scorecard over every stored result")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="lint again the files an older linter version judged")
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--sweep-linter", nargs=2, metavar=("VERSION", "STAMP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(*args.worker, args.export, args.max_params, args.sweep_linter)
        return 0
    start = time.perf_counter()
    if not args.report_only:
        sweep(args)
    rows = load_results(Path(args.results))
    # The scorecard covers what this command line selects (--report-only --all: every result).
    selected = None if args.all else set(choose(args))
    card = scorecard(rows, selected, None if args.all else args.export, linter_version())
    Path(args.scorecard).parent.mkdir(parents=True, exist_ok=True)
    Path(args.scorecard).write_text(json.dumps(card, indent=1) + "\n")
    how = (f"{'--sample ' + str(args.sample) + ' per library, ' if args.sample else ''}"
           f"exports {', '.join(args.export)}, --jobs {args.jobs}, "
           f"{args.timeout:.0f} s per model, models above {args.max_params:,} parameters skipped")
    section = markdown(card, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "how": how})
    if not args.no_readme:
        write_readme(section, Path(args.readme))
    print(section)
    print("SWEEP " + json.dumps({"counts": card["counts"].get("all", {}),
                                 "false_alarm_rules": {k: v["files"] for k, v in
                                                       card["false_alarms"].items()},
                                 "unsupported_ops": {k: len(v) for k, v in
                                                     card["unsupported_ops"].items()},
                                 "crashed": len(card["crashed"]),
                                 "wall_s": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
