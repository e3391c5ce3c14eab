"""The planted-defect sweep: does gradprobe find real defects in real library models?

What is measured. One representative per family (`tests/library_defects.py`: 23 families from
torchvision, timm and transformers, tiny sizes, default init) gets each defect of issue 10
planted at a known module: a zeroed first conv/linear of a residual branch, a NaN weight, one
stage at 10x He, a constant-filled projection (0.02), a zeroed normalisation weight that cuts
the signal, a BatchNorm shift of -10 before a ReLU, a gate stuck at 0. Each planted model is
exported (TorchScript trace by default; eval mode) and linted; then `gradprobe fix` (auto)
writes a repaired copy, which is linted again.

Per case:
  detected     a warning/error of the expected rule(s) that the healthy model of the same family
               and export does not have (for zero_norm and gate_zero, any rule: the issue asks
               for an error at the first dead point without naming the rule)
  right layer  one of those findings names the planted module (`model.<path>` in the export,
               or a sub-layer of it) or its planted parameter; for a zeroed BatchNorm that the
               export folded into its conv, the conv, when the finding says a BatchNorm is
               folded there (the legacy exporter keeps no name for the BatchNorm)
  fixed        after `gradprobe fix`, the re-lint has no error
A family without a site for a defect skips it, with the reason. The healthy baseline's own
warnings/errors are listed too (they are false alarms; see the hub sweep).

    python bench/planted_sweep.py                       # every family, TorchScript
    python bench/planted_sweep.py --families bert resnet18 --defects nan_weight zero_norm
    python bench/planted_sweep.py --report-only

Resumable JSON-lines results (`--results`), one subprocess per family killed at `--timeout`,
a scorecard JSON (`--scorecard`) and the section between the planted-sweep markers in
bench/README.md. The last line printed is `PLANTED {...}`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hub_sweep import PREFIX, ROOT, load_results, one_line, run_worker, write_readme

import library_defects as defects  # noqa: E402  (tests/ is on the path via hub_sweep)
import library_zoo as zoo  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "planted_sweep.jsonl"
SCORECARD = ROOT / "bench" / "scorecards" / "planted_sweep.json"  # committed: diff it
BEGIN, END = "<!-- planted-sweep:begin -->", "<!-- planted-sweep:end -->"


def serious(report) -> list:
    return [f for f in report.findings if f.severity.value in ("error", "warning")]


def brief(f) -> dict:
    evidence = f.evidence or {}
    folded = {k: evidence[k] for k in ("folded_norm", "folded_batchnorm") if evidence.get(k)}
    return {"rule": f.rule, "severity": f.severity.value, "layer": f.layer,
            "message": f.message[:300], **folded}


# ---------------------------------------------------------------------------------------------
# Worker: one family, its healthy baseline and every defect it has a site for


def worker(family_name: str, wanted: list[str], exports: list[str]) -> None:
    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.errors import GradprobeError, UnsupportedOperator
    from gradprobe.diagnostics.repair import repair

    family = defects.family_named(family_name)

    def emit(defect: str, how: str, **extra: object) -> None:
        print(PREFIX + json.dumps({"family": family.family, "library": family.library,
                                   "model": family.name, "defect": defect, "export": how,
                                   **extra}), flush=True)

    def lint(built: zoo.Built, how: str, directory: Path):
        """(path, report) or (None, a status row's fields)."""
        try:
            path = zoo.export(built, how, directory)
        except Exception as exc:
            return None, {"status": "export-failed", "detail": one_line(exc)}
        try:
            return path, diagnose(path, zoo.lint_options(built, how))
        except UnsupportedOperator as exc:
            return None, {"status": "unsupported", "op": exc.op_type, "detail": str(exc)[:300]}
        except GradprobeError as exc:
            return None, {"status": "lint-error", "detail": str(exc)[:300]}
        except Exception as exc:
            return None, {"status": "crashed", "detail": one_line(exc)}

    try:
        healthy = zoo.build(family.library, family.name)
    except Exception as exc:
        for how in exports:
            for defect in ["healthy", *wanted]:
                emit(defect, how, status="build-failed", detail=one_line(exc))
        return
    # where each site's BatchNorm goes in an eval export: the same for every export
    folds = {d: defects.fold_target(healthy.module, healthy.inputs, family.sites[d])
             for d in wanted if d in family.sites}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for how in exports:
            path, report = lint(healthy, how, directory)
            if path is None:
                for defect in ["healthy", *wanted]:
                    emit(defect, how, **report)
                continue
            baseline = {(f.rule, f.layer) for f in serious(report)}
            emit("healthy", how, status="done", findings=[brief(f) for f in serious(report)])
            for defect in wanted:
                site = family.sites.get(defect)
                if site is None:
                    emit(defect, how, status="skipped", detail=defects.SKIPPED[defect])
                    continue
                planted = zoo.Built(healthy.library, healthy.name, copy.deepcopy(healthy.module),
                                    healthy.inputs, healthy.parameters)
                defects.plant(planted.module.model, defect, site)
                paths = defects.site_layers(family, defect)
                start = time.perf_counter()
                path, report = lint(planted, how, directory)
                if path is None:
                    emit(defect, how, site=f"model.{site}", **report)
                    continue
                expected = defects.EXPECTED[defect]
                new = [f for f in serious(report) if (f.rule, f.layer) not in baseline]
                hits = [f for f in new if expected is None or f.rule in expected]
                fold = folds[defect]
                located = [f for f in hits if defects.finding_at_site(f, paths, fold)]
                row = {"status": "done", "site": f"model.{site}", "detected": bool(hits),
                       **({"fold_target": fold} if fold else {}),
                       "right_layer": bool(located),
                       "errors": sum(f.severity.value == "error" for f in hits),
                       "findings": [brief(f) for f in (located or hits or serious(report))[:4]]}
                if hits:
                    try:
                        out = repair(path, directory / f"fixed-{path.name}",
                                     zoo.lint_options(planted, how)).after
                        left = [f for f in out.findings if f.severity.value == "error"]
                        row["fixed"] = not left
                        row["after_fix"] = [brief(f) for f in left[:3]]
                    except Exception as exc:
                        row["fixed"] = False
                        row["after_fix"] = [{"rule": "fix failed", "message": one_line(exc)}]
                row["seconds"] = round(time.perf_counter() - start, 1)
                emit(defect, how, **row)
                for f in directory.iterdir():
                    f.unlink()


# ---------------------------------------------------------------------------------------------
# Parent


def run_family(name: str, wanted: list[str], exports: list[str], timeout: float) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", name, "--defects", *wanted, "--export", *exports]
    run = run_worker(cmd, 1, timeout)
    rows = run.rows
    family = defects.family_named(name)
    seen = {(r["defect"], r["export"]) for r in rows}
    for how in exports:
        for defect in ["healthy", *wanted]:
            if (defect, how) not in seen:
                rows.append({"family": name, "library": family.library, "model": family.name,
                             "defect": defect, "export": how,
                             "status": "timeout" if run.timed_out else "crashed",
                             "detail": run.failure})
    return rows


def scorecard(rows: list[dict]) -> dict:
    latest = {}
    for r in rows:
        latest[(r["family"], r["defect"], r["export"])] = r
    rows = sorted(latest.values(), key=lambda r: (r["family"], r["export"],
                                                  (["healthy", *defects.DEFECTS]).index(r["defect"])))
    for r in rows:  # right layer = a detected finding's layer is the site (the stored findings)
        if r["status"] == "done" and r["defect"] != "healthy":
            family = defects.family_named(r["family"])
            layers = defects.site_layers(family, r["defect"])
            r["right_layer"] = bool(r["detected"]) and any(
                defects.finding_at_site(f, layers, r.get("fold_target")) for f in r["findings"])
    per_defect: dict[str, dict] = {}
    for r in rows:
        if r["defect"] == "healthy":
            continue
        c = per_defect.setdefault(r["defect"], defaultdict(int))
        c[r["status"]] += 1
        if r["status"] == "done":
            c["cases"] += 1
            c["detected"] += r["detected"]
            c["right_layer"] += r["right_layer"]
            c["fixed"] += bool(r.get("fixed"))
    total = defaultdict(int)
    for c in per_defect.values():
        for k, v in c.items():
            total[k] += v
    misses = [{"case": f"{r['family']}/{r['defect']}:{r['export']}", "site": r.get("site"),
               "detected": r.get("detected"), "right_layer": r.get("right_layer"),
               "fixed": r.get("fixed"), "status": r["status"],
               "got": r.get("findings", [])[:2] or r.get("detail"),
               "after_fix": r.get("after_fix", [])[:2]}
              for r in rows if r["defect"] != "healthy" and r["status"] not in ("skipped",)
              and not (r.get("detected") and r.get("right_layer") and r.get("fixed"))]
    # A baseline the exporter could not write is no alarm: it is listed with its cases.
    healthy = {f"{r['family']}:{r['export']}": r.get("findings", r.get("detail"))
               for r in rows if r["defect"] == "healthy" and r["status"] != "export-failed"}
    return {"schema": "gradprobe.planted-sweep/v1",
            "families": len({r["family"] for r in rows}),
            "total": dict(total), "per_defect": {k: dict(v) for k, v in per_defect.items()},
            "cases": [{k: r.get(k) for k in ("family", "model", "defect", "export", "status",
                                             "site", "detected", "right_layer", "fixed")}
                      for r in rows if r["defect"] != "healthy"],
            "not_all_three": misses, "healthy_alarms": {k: v for k, v in healthy.items() if v}}


def markdown(card: dict, meta: str) -> str:
    lines = [BEGIN, "", "### Planted-defect sweep: latest scorecard", "", meta, "",
             "| defect | cases | detected | right layer | fixed | skipped (no site) | other |",
             "|---|---|---|---|---|---|---|"]
    for defect in defects.DEFECTS:
        c = card["per_defect"].get(defect)
        if not c:
            continue
        other = ", ".join(f"{k} {v}" for k, v in c.items() if k not in (
            "cases", "detected", "right_layer", "fixed", "done", "skipped"))
        lines.append(f"| {defect} | {c.get('cases', 0)} | {c.get('detected', 0)} | "
                     f"{c.get('right_layer', 0)} | {c.get('fixed', 0)} | {c.get('skipped', 0)} "
                     f"| {other} |")
    t = card["total"]
    lines.append(f"| **all** | {t.get('cases', 0)} | {t.get('detected', 0)} | "
                 f"{t.get('right_layer', 0)} | {t.get('fixed', 0)} | {t.get('skipped', 0)} | |")
    lines += ["", "Per case (D detected, L right layer, F fixed; - no):", "",
              "| family | " + " | ".join(defects.DEFECTS) + " |",
              "|---" * (len(defects.DEFECTS) + 1) + "|"]
    grid: dict[str, dict[str, str]] = defaultdict(dict)
    for c in card["cases"]:
        key = c["family"] + ("" if c["export"] == "torchscript" else f" ({c['export']})")
        if c["status"] == "skipped":
            mark = "n/a"
        elif c["status"] != "done":
            mark = c["status"]
        else:
            mark = "".join(ch if ok else "-" for ch, ok in (
                ("D", c["detected"]), ("L", c["right_layer"]), ("F", c["fixed"])))
        grid[key][c["defect"]] = mark
    for key, marks in grid.items():
        lines.append(f"| {key} | " + " | ".join(marks.get(d, "") for d in defects.DEFECTS) + " |")
    lines += ["", "Healthy baselines with warnings/errors: " + (", ".join(
        card["healthy_alarms"]) or "none") + ".", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", help="family names (default: all)")
    parser.add_argument("--defects", nargs="+", choices=defects.DEFECTS, default=list(defects.DEFECTS))
    parser.add_argument("--export", nargs="+", choices=zoo.EXPORTS, default=["torchscript"])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per family")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--scorecard", default=str(SCORECARD))
    parser.add_argument("--readme", default=str(ROOT / "bench" / "README.md"))
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)
        worker(args.worker, args.defects, args.export)
        return 0
    names = args.families or [f.family for f in defects.FAMILIES]
    for n in names:
        defects.family_named(n)  # unknown names fail before any work
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        done = {(r["family"], r["defect"], r["export"]) for r in load_results(results)}
        todo = []
        for n in names:
            missing = [d for d in ["healthy", *args.defects] for h in args.export
                       if (n, d, h) not in done]
            if missing:
                todo.append(n)
        lock, counter = threading.Lock(), [0]
        print(f"{len(todo)} family(ies) to run", flush=True)

        def one(name: str) -> None:
            rows = run_family(name, args.defects, args.export, args.timeout)
            with lock:
                counter[0] += 1
                with results.open("a") as out:
                    for r in rows:
                        out.write(json.dumps(r) + "\n")
                for r in rows:
                    if r["status"] == "done" and r["defect"] != "healthy":
                        what = " ".join(k for k in ("detected", "right_layer", "fixed") if r.get(k))
                        what = what or "MISSED " + "; ".join(
                            f"{f['rule']}@{f['layer']}" for f in r["findings"][:2])
                    else:
                        what = r["status"] + (": " + r["detail"][:80] if r.get("detail") else "")
                        if r["defect"] == "healthy" and r["status"] == "done":
                            what = "healthy: " + (", ".join(f"{f['rule']}@{f['layer']}" for f in
                                                            r["findings"][:3]) or "clean")
                    print(f"[{counter[0]}/{len(todo)}] {r['family']} {r['defect']} "
                          f"{r['export']}: {what}", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, todo))
    rows = [r for r in load_results(results) if r["family"] in names
            and r["export"] in args.export and r["defect"] in ("healthy", *args.defects)]
    card = scorecard(rows)
    Path(args.scorecard).parent.mkdir(parents=True, exist_ok=True)
    Path(args.scorecard).write_text(json.dumps(card, indent=1) + "\n")
    meta = (f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {card['families']} "
            f"families, exports {', '.join(args.export)}. A case counts once per export.")
    section = markdown(card, meta)
    if not args.no_readme:
        write_readme(section, Path(args.readme), BEGIN, END)
    print(section)
    print("PLANTED " + json.dumps({"total": card["total"],
                                   "wall_s": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
