"""Does the probe say the same on a GPU as on the CPU? Library models, healthy and planted.

The CUDA path is meant to be the CPU path with another device: the same synthetic batch (drawn
on the CPU and moved), the same taps and statistics, the same rules. This script lints the same
exported files twice, once per device, and compares what a user sees:

  findings   the set of (rule, severity, layer) at warning or error must be equal
  statistics per-layer activation variance and gradient RMS, and per-parameter |g|/|w|:
             the largest relative difference between the devices (float32, and cuDNN's
             TF32 convolutions where the card has them: differences of ~1e-3 are expected)

Families come from `tests/library_defects.py` (torchvision, timm and transformers at their own
default init, tiny sizes, nothing downloaded); each is linted healthy and with every defect it
has a site for, exported as TorchScript (trace) and ONNX (legacy exporter), eval mode.

    python bench/gpu_parity.py                         # cuda against cpu, the default families
    python bench/gpu_parity.py --devices cpu cpu       # a dry run of the harness on a CPU box
    python bench/gpu_parity.py --families resnet18 bert --exports torchscript

Prints one line per case, a summary, and `PARITY {json}` last. Exit status 1 when a case's
findings differ between the devices.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import library_defects as defects  # noqa: E402
import library_zoo as zoo  # noqa: E402

DEFAULT_FAMILIES = ("resnet18", "efficientnet", "mobilenetv3", "convnext", "vit", "bert",
                    "gpt2", "llama")


def _serious(report) -> set[tuple[str, str, str]]:  # noqa: ANN001 - a DiagnoseReport
    return {(f.rule, f.severity.value, f.layer) for f in report.findings
            if f.severity.value in ("warning", "error")}


def _relative(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0 if (math.isnan(a) and math.isnan(b)) or a == b else math.inf
    scale = max(abs(a), abs(b))
    return 0.0 if scale < 1e-30 else abs(a - b) / scale


def statistics_gap(first, second) -> float:  # noqa: ANN001 - DiagnoseReports
    """Largest relative difference of the per-layer and per-parameter statistics."""
    gap = 0.0
    layers = {layer.name: layer for layer in second.layers}
    for layer in first.layers:
        other = layers.get(layer.name)
        if other is None:
            return math.inf
        if layer.activation and other.activation:
            gap = max(gap, _relative(layer.activation.var, other.activation.var))
        if layer.gradient and other.gradient:
            gap = max(gap, _relative(layer.gradient.rms, other.gradient.rms))
    params = {p.name: p for p in second.parameters}
    for p in first.parameters:
        other = params.get(p.name)
        if other is not None:
            gap = max(gap, _relative(p.grad_to_weight, other.grad_to_weight))
    return gap


def lint_both(path: Path, built: zoo.Built, how: str, devices: list[str]) -> dict:
    from gradprobe.diagnostics.api import diagnose

    options = zoo.lint_options(built, how)
    reports, seconds = [], []
    for device in devices:
        began = time.perf_counter()
        reports.append(diagnose(path, options.model_copy(update={"device": device})))
        seconds.append(time.perf_counter() - began)
    first, second = (_serious(r) for r in reports)
    return {"same_findings": first == second, "findings": sorted(first),
            "only_first": sorted(first - second), "only_second": sorted(second - first),
            "stat_gap": statistics_gap(*reports), "seconds": [round(s, 2) for s in seconds],
            "device_reported": [r.device for r in reports]}


def run(families: list[str], exports: list[str], devices: list[str]) -> list[dict]:
    rows = []
    for name in families:
        family = defects.family_named(name)
        healthy = zoo.build(family.library, family.name)
        cases = [("healthy", None)] + [(d, family.sites[d]) for d in defects.DEFECTS
                                       if d in family.sites]
        for defect, site in cases:
            built = healthy
            if site is not None:
                built = zoo.Built(healthy.library, healthy.name, copy.deepcopy(healthy.module),
                                  healthy.inputs, healthy.parameters)
                defects.plant(built.module.model, defect, site)
            for how in exports:
                with tempfile.TemporaryDirectory(prefix="gradprobe-parity-") as tmp:
                    row = {"family": name, "defect": defect, "export": how}
                    try:
                        path = zoo.export(built, how, Path(tmp))
                    except Exception as exc:  # noqa: BLE001 - the exporter's failure, not ours
                        row.update(status="export-failed", detail=str(exc).splitlines()[0][:160])
                        rows.append(row)
                        continue
                    try:
                        row.update(status="done", **lint_both(path, built, how, devices))
                    except Exception as exc:  # noqa: BLE001 - reported per case, never hidden
                        row.update(status="error", detail=f"{type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
                rows.append(row)
                _print_row(row)
    return rows


def _print_row(row: dict) -> None:
    head = f"{row['family']:<13} {row['defect']:<12} {row['export']:<12}"
    if row["status"] != "done":
        print(f"{head} {row['status']}: {row.get('detail', '')}", flush=True)
        return
    verdict = "same" if row["same_findings"] else "DIFFERENT"
    extra = "" if row["same_findings"] else f" only {row['only_first']} / {row['only_second']}"
    print(f"{head} {verdict:<9} {len(row['findings'])} findings, stat gap {row['stat_gap']:.1e}, "
          f"{row['seconds'][0]:.2f} s / {row['seconds'][1]:.2f} s{extra}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"], metavar="DEVICE")
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES),
                        choices=[f.family for f in defects.FAMILIES])
    parser.add_argument("--exports", nargs="+", default=["torchscript", "onnx_legacy"],
                        choices=list(zoo.EXPORTS))
    args = parser.parse_args(argv)
    if "cuda" in args.devices and not torch.cuda.is_available():
        print("gpu_parity: no CUDA device is available on this machine", file=sys.stderr)
        return 2
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    warnings.filterwarnings("ignore")  # the exporters' and torch.jit's deprecation notes
    began = time.perf_counter()
    rows = run(args.families, args.exports, args.devices)
    done = [r for r in rows if r["status"] == "done"]
    summary = {
        "devices": args.devices, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cases": len(rows), "compared": len(done),
        "same_findings": sum(r["same_findings"] for r in done),
        "different": [f"{r['family']}/{r['defect']}/{r['export']}" for r in done
                      if not r["same_findings"]],
        "errors": [f"{r['family']}/{r['defect']}/{r['export']}: {r['detail']}" for r in rows
                   if r["status"] == "error"],
        "largest_stat_gap": max((r["stat_gap"] for r in done), default=0.0),
        "median_seconds": [sorted(r["seconds"][i] for r in done)[len(done) // 2] if done else 0
                           for i in (0, 1)],
        "wall_s": round(time.perf_counter() - began, 1),
    }
    print(f"{summary['same_findings']}/{summary['compared']} cases with the same findings on "
          f"{args.devices[0]} and {args.devices[1]}; largest statistics gap "
          f"{summary['largest_stat_gap']:.1e}; {len(summary['errors'])} errors")
    print("PARITY " + json.dumps(summary))
    return 0 if not summary["different"] and not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
