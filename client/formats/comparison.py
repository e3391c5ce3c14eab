"""What `gradprobe fix` prints: the tensors that changed, what re-initialisation cannot fix, the
counts before and after, and the findings that remain at warning or above — plus, under
--verbose, the layer table before and after and every tensor left alone."""

from __future__ import annotations

from gradprobe.client.formats.text import (
    finding_lines,
    fit_op,
    format_number,
    op_column_width,
    shown_op,
)
from gradprobe.diagnostics.repair import ChangedTensor, RepairOutcome
from gradprobe.diagnostics.report import Finding, LayerReport, Report, Severity


def _layer_key(layer: LayerReport) -> tuple[str, str]:
    return layer.name, layer.op


def _paired(before: Report, after: Report) -> list[tuple[LayerReport | None, LayerReport | None]]:
    """Rows of both reports matched by (layer, op) and occurrence, in the fixed model's order.
    Saving can rename nodes (untied shared initializers), so node names do not pair them."""
    def keyed(report: Report) -> dict[tuple[str, str, int], LayerReport]:
        seen: dict[tuple[str, str], int] = {}
        out = {}
        for layer in report.layers:
            k = _layer_key(layer)
            seen[k] = seen.get(k, 0) + 1
            out[(*k, seen[k])] = layer
        return out

    old, new = keyed(before), keyed(after)
    rows = [(old.get(k), layer) for k, layer in new.items()]
    rows += [(layer, None) for k, layer in old.items() if k not in new]
    return rows


def _table(outcome: RepairOutcome) -> list[str]:
    changed_layers = {c.layer for c in outcome.changed}
    rows = _paired(outcome.before, outcome.after)
    width = max([len((b or a).name) for b, a in rows] + [5])  # type: ignore[union-attr]
    op_width = op_column_width([layer for pair in rows for layer in pair if layer is not None])
    head = (f"  {'layer':<{width}}  {'op':<{op_width}} {'act var before':>14} {'after':>9}   "
            f"{'grad rms before':>15} {'after':>9}")
    lines = [head, "  " + "-" * (len(head) - 2)]
    for b, a in rows:
        layer = a or b
        assert layer is not None
        op = fit_op(shown_op(layer), op_width)
        mark = "*" if layer.name in changed_layers and layer.role == "linear" else " "

        def act(r: LayerReport | None) -> str:
            return format_number(r.activation.var if r and r.activation else None)

        def grad(r: LayerReport | None) -> str:
            return format_number(r.gradient.rms if r and r.gradient else None)

        lines.append(f"{mark} {layer.name:<{width}}  {op:<{op_width}} {act(b):>14} {act(a):>9}   "
                     f"{grad(b):>15} {grad(a):>9}")
    return lines


def _scheme_text(c: ChangedTensor) -> str:
    if c.scheme == "zeros":
        return "zeros"
    if c.scheme == "lsuv":
        return f"orthogonal x {c.gain:.4g} (std {format_number(c.std)})" if c.gain else "orthogonal"
    shown = {"gain": c.gain if c.gain not in (None, 1.0) else None,
             "std": c.std if not c.scheme.endswith("_uniform") else None,
             "bound": c.bound if c.scheme.endswith("_uniform") else None}
    numbers = [f"{k}={v:.4g}" for k, v in shown.items() if v is not None]
    return f"{c.scheme}({', '.join(numbers)})"


def _change_lines(changed: list[ChangedTensor]) -> list[str]:
    """One line per tensor; a run of tensors changed the same way for the same reasons (the
    40 layers of a trend) folds into one line naming the first and the last."""
    groups: list[list[ChangedTensor]] = []
    for c in changed:
        key = (_scheme_text(c), c.reasons, c.round)
        if groups and c.scheme != "lsuv" and (_scheme_text(groups[-1][0]), groups[-1][0].reasons,
                                              groups[-1][0].round) == key:
            groups[-1].append(c)
        else:
            groups.append([c])
    width = max([len(_shown(c)) for c in changed] + [10])
    lines = []
    for group in groups:
        first = group[0]
        reasons = ", ".join(first.reasons) + (f" (round {first.round})" if first.round > 1 else "")
        if len(group) > 3:
            names = f"{_shown(first)} .. {_shown(group[-1])} ({len(group)} tensors)"
            lines.append(f"  {names}")
            lines.append(f"  {'':<{width}} {_scheme_text(first):<40} {reasons}")
        else:
            lines += [f"  {_shown(c):<{width}} {_scheme_text(c):<40} {reasons}" for c in group]
    return lines


# Lines of a list shown without --verbose.
SHORT_LIST = 10


def _shown(c: ChangedTensor) -> str:
    """The tensor as the user's code names it, with the file's name when that differs."""
    if c.expr and not c.expr.startswith("model.get_parameter"):
        return f"{c.expr.removeprefix('model.')} ({c.name})" if is_exporter_name(c.name) else c.name
    return c.name


def is_exporter_name(name: str) -> bool:
    return "::" in name or name.startswith(("val_", "_val_"))


def _left_alone_summary(lines: list[str], shown: int = 3) -> list[str]:
    """Eight `onnx::Conv_199: deliberate (zero-weights, info)` lines -> one line with the count
    (a reason with at most `shown` tensors keeps its lines)."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        _, sep, why = line.partition(": ")
        groups.setdefault(why if sep else line, []).append(line)
    out = []
    for why, members in groups.items():
        if len(members) <= shown:
            out += [f"  {line}" for line in members]
        else:
            out.append(f"  {len(members)} tensor(s): {why} (--verbose lists them)")
    return out


def _new_findings(before: Report, after: Report) -> list[Finding]:
    # By rule and layer: saving may rename a layer's tensors (untied shared initializers).
    known = {(f.rule, f.layer) for f in before.findings}
    return [f for f in after.findings if (f.rule, f.layer) not in known]


def _counts(report: Report) -> str:
    s = report.summary
    return f"{s.error} error(s), {s.warning} warning(s), {s.info} info"


def render_comparison(outcome: RepairOutcome, *, verbose: bool = False) -> str:
    before, after = outcome.before, outcome.after
    out = [f"{outcome.source} -> {outcome.output}  ({outcome.format}, seed {after.seed}, "
           f"method {outcome.method})"]
    if outcome.method == "lsuv":
        out.append(f"LSUV re-initialises every linear/conv layer ({len(outcome.lsuv)}), not only "
                   f"the flagged ones: orthogonal start, then each layer rescaled to unit output "
                   f"variance on the probe batch.")
        unconverged = [item.layer for item in outcome.lsuv if not item.converged]
        if unconverged:
            out.append(f"note: LSUV did not reach unit variance at {', '.join(unconverged[:5])}"
                       + (" ..." if len(unconverged) > 5 else ""))
    if verbose:
        out += ["", *_table(outcome), "  (* = layer re-initialised)"]
    out.append("")

    if outcome.changed:
        out.append(f"re-initialised ({len(outcome.changed)} tensor(s)):")
        lines = _change_lines(outcome.changed)
        if not verbose and len(lines) > SHORT_LIST:
            rest = sum(1 for line in lines[SHORT_LIST:] if not line.startswith("   "))
            lines = lines[:SHORT_LIST] + [f"  ... {rest} more line(s) (--verbose lists them)"]
        out += lines
    else:
        out.append("re-initialised: nothing (no finding asks for a new init)")
    if outcome.left_alone:
        out.append("left as they are:")
        out += ([f"  {line}" for line in outcome.left_alone] if verbose
                else _left_alone_summary(outcome.left_alone))
    if outcome.not_fixable:
        out += ["", "not fixable by re-initialisation:"]
        for f in outcome.not_fixable:
            out += [f"  {line}" for line in finding_lines(f)[:2]]
            if f.fix is not None and f.fix.advice:
                out.append(f"          instead: {f.fix.advice}")
    out += ["", f"before: {_counts(before)}", f"after:  {_counts(after)}"]
    new = _new_findings(before, after)
    if new:  # the repair uncovered these (a layer that now passes signal shows its own problem)
        out += ["", "new after the fix (uncovered by it, not there before):"]
        for f in new:
            out += finding_lines(f)
    shown = [f for f in after.findings if f not in new
             and (verbose or f.severity is not Severity.INFO)]
    if shown:
        out += ["", "remaining findings:"]
        for f in shown:
            out += finding_lines(f)
    hidden = sum(f.severity is Severity.INFO and f not in new for f in after.findings)
    if hidden and not verbose:
        out.append(f"({hidden} info finding(s) unchanged by the fix: --verbose lists them)")
    if not after.fails("warning"):
        out.append("no errors or warnings remain: the network looks trainable as initialised")
    return "\n".join(out)
