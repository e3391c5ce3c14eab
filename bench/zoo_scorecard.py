"""The zoo scorecard: how often gradprobe is right on real architectures.

For every healthy architecture (and its deliberate-zero variants) in every export path: a false
alarm is any warning or error. For every planted defect: *detected* when the expected rule fires
at warning or error, *localized* when it names the expected layer, *fixed* when `gradprobe fix`
(auto) leaves neither that finding nor any error behind. Defects no re-initialisation can fix
(an operation that makes NaN, a masked branch, a sigmoid stack) count as fixable: n/a.

    python bench/zoo_scorecard.py [--dynamo]      # --dynamo adds the slow dynamo ONNX exporter

Prints a table, then one `SCORE {...}` JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402
from defects import DEFECTS  # noqa: E402
from gradprobe.diagnostics.api import diagnose  # noqa: E402
from gradprobe.diagnostics.options import DiagnoseOptions  # noqa: E402
from gradprobe.diagnostics.repair import repair  # noqa: E402
from gradprobe.diagnostics.report import Report  # noqa: E402

HEALTHY = ["mlp", "resnet", "mobilenet", "vit", "text_encoder", "lstm", "gru", "vit_timm",
           "text_encoder_bert", "resnet_zero_residual", "vit_zero_head"]

# defect -> (expected rule, expected layer prefix, fixable by re-initialisation)
MLP_DEFECTS: dict[str, tuple[str, str, bool]] = {
    "zero_hidden": ("zero-weights", "net.2", True),
    "constant_hidden": ("constant-weights", "net.0", True),
    "nan_weight": ("nonfinite-weights", "net.2", True),
    "nan_from_sqrt": ("nonfinite-values", "fc2", False),
    "large_init": ("init-scale", "net.2", True),
    "small_init": ("init-scale", "net.2", True),
    "dead_relu": ("dead-relu", "net.3", True),
    "saturated_tanh": ("saturated-activation", "net.1", True),
    "sigmoid_stack": ("vanishing-gradients", "net.0", False),
    "masked_branch": ("dead-gradients", "fc3", False),
    "chain_1.5": ("exploding-activations", "layers.", True),
    "chain_0.5": ("vanishing-activations", "layers.", True),
}


def _resnet(edit: Callable[[zoo.ResNet], None]) -> Callable[[], tuple[nn.Module, tuple]]:
    def build():
        model = zoo.build("resnet")
        with torch.no_grad():
            edit(model)
        return model, zoo.example_inputs("resnet", batch=8)
    return build


RESNET_DEFECTS: dict[str, tuple[Callable, str, str, bool, tuple[str, ...]]] = {
    "resnet_zero_branch_conv": (_resnet(lambda m: m.layer1[0].conv1.weight.zero_()),
                                "zero-weights", "layer1.0.conv1", True, ()),
    "resnet_nan_conv": (_resnet(lambda m: m.layer2[0].conv1.weight.view(-1)[7].fill_(float("nan"))),
                        "nonfinite-weights", "layer2.0.conv1", True, ()),
    "resnet_dead_bn_shift": (_resnet(lambda m: m.layer1[1].bn1.bias.fill_(-10.0)),
                             "dead-relu", "layer1.1.relu", True, ()),
    # Behind BatchNorm only |g|/|w| shows it; a folded export bakes BN into the weight.
    "resnet_large_conv": (_resnet(lambda m: m.layer2[1].conv1.weight.mul_(10.0)),
                          "init-scale", "layer2.1.conv1", True, ("onnx_folded", "onnx_dynamo")),
}


def export(model: nn.Module, args: tuple, root: Path, stem: str, how: str) -> tuple[Path, DiagnoseOptions]:
    if how == "traced":
        path = zoo.export_torchscript(model, args, root / f"{stem}.pt")
        return path, DiagnoseOptions(device="cpu", input_shapes=[list(a.shape) for a in args],
                                     input_dtypes=[str(a.dtype).removeprefix("torch.") for a in args])
    path = zoo.export_onnx(model, args, root / f"{stem}.{how}.onnx", dynamo=how == "onnx_dynamo",
                           train_bn=how == "onnx_bn")
    return path, DiagnoseOptions(device="cpu", batch_size=args[0].shape[0])


def serious(report: Report) -> list:
    return [f for f in report.findings if f.severity.value in ("error", "warning")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamo", action="store_true", help="include the dynamo ONNX exporter")
    args = parser.parse_args()
    exports = ["traced", "onnx_folded", "onnx_bn"] + (["onnx_dynamo"] if args.dynamo else [])
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in HEALTHY:
            for how in exports:
                model = zoo.build(name)
                path, options = export(model, zoo.example_inputs(name, batch=8), root, name, how)
                alarms = serious(diagnose(path, options))
                rows.append({"kind": "healthy", "case": name, "export": how,
                             "false_alarms": len(alarms),
                             "detail": "; ".join(f"{f.rule}@{f.layer}" for f in alarms)})
        planted = {name: (lambda n=name: DEFECTS[n](), *spec, ()) for name, spec in MLP_DEFECTS.items()}
        planted.update(RESNET_DEFECTS)
        for name, (build, rule, layer, fixable, skip) in planted.items():
            for how in exports:
                if how in skip:
                    continue
                model, inputs = build()
                path, options = export(model, inputs, root, name, how)
                report = diagnose(path, options)
                hits = [f for f in serious(report) if f.rule == rule]
                located = any(f.layer.startswith(layer) for f in hits)
                fixed = None
                if fixable and hits:
                    out = repair(path, root / f"fixed-{path.name}", options).after
                    fixed = not [f for f in serious(out) if f.rule == rule or f.severity.value == "error"]
                rows.append({"kind": "planted", "case": name, "export": how, "rule": rule,
                             "detected": bool(hits), "localized": located, "fixed": fixed,
                             "detail": "; ".join(f"{f.rule}@{f.layer}" for f in serious(report))})
    healthy = [r for r in rows if r["kind"] == "healthy"]
    planted_rows = [r for r in rows if r["kind"] == "planted"]
    fixable_rows = [r for r in planted_rows if r["fixed"] is not None]
    score = {
        "healthy_cases": len(healthy),
        "false_alarms": sum(1 for r in healthy if r["false_alarms"]),
        "planted_cases": len(planted_rows),
        "detected": sum(r["detected"] for r in planted_rows),
        "localized": sum(r["localized"] for r in planted_rows),
        "fixable": len(fixable_rows),
        "fixed": sum(bool(r["fixed"]) for r in fixable_rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"{'case':26} {'export':12} {'result':30} findings")
    for r in rows:
        if r["kind"] == "healthy":
            result = "clean" if not r["false_alarms"] else f"FALSE ALARM x{r['false_alarms']}"
        else:
            fixed = {None: "fix n/a", True: "fixed", False: "NOT FIXED"}[r["fixed"]]
            result = (f"{'detected' if r['detected'] else 'MISSED'}, "
                      f"{'localized' if r['localized'] else 'WRONG LAYER'}, {fixed}")
        print(f"{r['case']:26} {r['export']:12} {result:30} {r['detail'][:90]}")
    print(f"\nhealthy: {score['healthy_cases']} cases, {score['false_alarms']} with a false alarm; "
          f"planted: {score['detected']}/{score['planted_cases']} detected, "
          f"{score['localized']}/{score['planted_cases']} localized, "
          f"{score['fixed']}/{score['fixable']} fixed ({score['seconds']} s)")
    print("SCORE " + json.dumps(score))
    return 0


if __name__ == "__main__":
    sys.exit(main())
