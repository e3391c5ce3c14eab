"""`--format text`: what a person reads in a terminal — the layer table, then the findings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradprobe.diagnostics.report import Finding, LayerReport, Report, Severity

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

_MARK = {"error": "E", "warning": "W", "info": "i"}


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _layer_rows(report: Report) -> list[str]:
    worst: dict[str, Severity] = {}
    for f in report.findings:
        if f.layer not in worst or f.severity.rank > worst[f.layer].rank:
            worst[f.layer] = f.severity
    flagged = {layer: _MARK[severity.value] for layer, severity in worst.items()}
    width = max([len(layer.name) for layer in report.layers] + [5])
    op_width = op_column_width(report.layers)
    head = (f"  {'layer':<{width}}  {'op':<{op_width}} {'act var':>9} {'mean':>9} {'dead':>5} "
            f"{'sat':>5} {'grad rms':>9}")
    rows = [head, "  " + "-" * (len(head) - 2)]
    for layer in report.layers:
        rows.append(_layer_row(layer, width, op_width, flagged.get(layer.name, " ")))
    return rows


# Op names are short in ONNX (`Conv`) and long in TorchScript (`aten::_convolution`): the column
# fits the longest, up to a bound past which a name is cut visibly, never silently.
MAX_OP_WIDTH = 24


def shown_op(layer: LayerReport) -> str:
    return layer.op if layer.role != "activation" else (layer.nonlinearity or layer.op)


def op_column_width(layers: list[LayerReport]) -> int:
    return min(max([len(shown_op(layer)) for layer in layers] + [4]), MAX_OP_WIDTH)


def fit_op(op: str, width: int) -> str:
    return op if len(op) <= width else op[: width - 1] + "~"


def _layer_row(layer: LayerReport, width: int, op_width: int, mark: str) -> str:
    act, grad = layer.activation, layer.gradient
    op = fit_op(shown_op(layer), op_width)
    dead = _share(act.dead_units) if act and (layer.nonlinearity == "relu" and layer.role == "activation") else "-"
    sat = _share(act.saturation) if act and layer.nonlinearity in ("sigmoid", "tanh") and layer.role == "activation" else "-"
    return (f"{mark} {layer.name:<{width}}  {op:<{op_width}} {format_number(act.var if act else None):>9} "
            f"{format_number(act.mean if act else None):>9} {dead:>5} {sat:>5} {format_number(grad.rms if grad else None):>9}")


def finding_lines(f: Finding) -> list[str]:
    lines = [f"{f.severity.value:<7} {f.rule:<22} {f.layer}", f"        {f.message}"]
    if f.fix is not None:
        if f.fix.code:
            code = f.fix.code.splitlines()
            lines.append(f"        fix: {code[0]}")
            lines += [f"             {line}" for line in code[1:]]
        if f.fix.advice:
            lines.append(f"        also: {f.fix.advice}")
    return lines


def render_one(report: Report) -> str:
    m = report.model
    inputs = ", ".join(f"{i.name} {'x'.join(map(str, i.shape))} {i.dtype}" for i in m.inputs)
    t = report.timing
    out = [
        f"{m.path or '<bytes>'}  ({m.format}, sha256 {m.sha256[:12]}, inputs: {inputs})",
        f"device {report.device}, seed {report.seed}, {t.total_s:.2f}s "
        f"(load {t.load_s:.2f}s, probe {t.probe_s:.2f}s, rules {t.rules_s:.2f}s)",
    ]
    out += [f"note: {n}" for n in m.notes]
    # One line for all sharing (the pairs are in the JSON, model.shared_parameters), and none
    # when the loader's own note already counted it (ONNX exporters merging equal values).
    groups = {tuple(users) for users in m.shared_parameters.values()}
    if groups and not any("shared by several layers" in note for note in m.notes):
        layers = len({layer for users in groups for layer in users})
        out.append(f"note: {len(groups)} tensor(s) in the file are each read by several layers "
                   f"({layers} layers: tied weights); --format json lists them under "
                   f"model.shared_parameters")
    out += ["", *_layer_rows(report), ""]
    for f in report.findings:
        out += finding_lines(f)
    s = report.summary
    out.append(f"{s.error} error(s), {s.warning} warning(s), {s.info} info"
               if report.findings else "no findings: the network looks trainable as initialised")
    return "\n".join(out)


def render(reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
    # Files that failed are already one line each on stderr; the skipped ones are said here.
    from gradprobe.client.formats import skipped_summary

    parts = [render_one(r) for r in reports]
    summary = skipped_summary(unlinted)
    if summary:
        names = ", ".join(u.path for u in unlinted if not u.failed)
        parts.append(f"{summary}: {names}")
    return "\n\n".join(parts)
