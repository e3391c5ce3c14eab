"""`--html FILE`: one self-contained page per run — for each model, activation variance and
grad rms (the text table's two columns) against depth on log axes, one curve per kind of layer
(conv/linear outputs, normalisations, activations: a single curve through all of them would
zig-zag between kinds), the flagged layers marked and named on the x axis, the findings with
their fixes, the layer table, and (after `gradprobe fix`) the curves before and after the fix.

The page carries everything inline: CSS and SVG drawn here, no script, no font, no network. A
Content-Security-Policy forbids any fetch, so it opens the same offline, from a CI artifact or
an e-mail. Every string that comes from the model file (layer, node, parameter names, paths)
is escaped."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from gradprobe.client.formats._shared import fix_sentence
from gradprobe.diagnostics.report import Finding, LayerReport, Report, Severity

WIDTH, HEIGHT = 760, 370
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 48, 118
# One curve per kind of layer output; the role names come from the loaders' probe points.
KINDS = (("linear", "conv/linear", "#2e7d32"), ("norm", "norm", "#00838f"),
         ("activation", "activation", "#6a1b9a"), ("other", "other", "#5d4037"))
LABEL_CHARS = 22  # x-axis layer names longer than this are cut (the full name is the tooltip)
COLORS = {Severity.ERROR: "#c62828", Severity.WARNING: "#ef6c00", Severity.INFO: "#1565c0"}
AFTER, BEFORE = "#2e7d32", "#9e9e9e"


def render_html(reports: list[Report], *, before: list[Report] | None = None) -> str:
    if before is not None and len(before) != len(reports):
        raise ValueError("`before` needs one report per report, in the same order")
    sections = [_model_section(i, report, before[i] if before else None)
                for i, report in enumerate(reports)]
    totals = {s: sum(1 for r in reports for f in r.findings if f.severity is s) for s in Severity}
    title = "gradprobe report" if not before else "gradprobe fix report"
    nav = "".join(f'<li><a href="#model-{i}">{escape(_label(r))}</a> {_counts(r)}</li>'
                  for i, r in enumerate(reports))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>{len(reports)} model(s): {_badge(Severity.ERROR, totals[Severity.ERROR])}
{_badge(Severity.WARNING, totals[Severity.WARNING])} {_badge(Severity.INFO, totals[Severity.INFO])}</p>
<ul class="nav">{nav}</ul>
</header>
<main>
{"".join(sections)}
</main>
<footer>gradprobe {escape(reports[0].version if reports else "")}: activations and gradients of
one seeded synthetic batch at initialisation.</footer>
</body>
</html>
"""


# ---------------------------------------------------------------- one model

def _model_section(index: int, report: Report, before: Report | None) -> str:
    flagged = _flags(report)
    order = _depth_order(report, before)
    act = _kind_series(report, before, order, "var")
    grad = _kind_series(report, before, order, "rms")
    earlier = _flags(before) if before is not None else {}
    plots = (_plot("Activation variance by depth", act, order, flagged, earlier)
             + _plot("Grad rms by depth", grad, order, flagged, earlier))
    resolved = _resolved(before, report) if before is not None else []
    return f"""<section id="model-{index}">
<h2>{escape(_label(report))}</h2>
{_meta(report, before)}
<div class="plots">{plots}</div>
<h3>Findings {_counts(report)}</h3>
{_findings_table(report.findings, index)}
{_resolved_list(resolved)}
{_layer_table(report, flagged, index)}
</section>
"""


def _kind_series(report: Report, before: Report | None, order: list[str],
                 stat: str) -> list[Series]:
    """One series per kind of layer present; after a fix, each kind's "before" curve too,
    dashed and drawn over the "after" one so neither hides the other."""
    kinds = {layer.name: (layer.role if layer.role in dict((k, k) for k, _, _ in KINDS)
                          else "other") for r in (report, before) if r for layer in r.layers}
    series = []
    for kind, label, color in KINDS:
        names = {name for name, k in kinds.items() if k == kind}
        if not names.intersection(order):
            continue
        suffix = " (after fix)" if before is not None else ""
        series.append(Series(label + suffix, color, _values(report, order, stat, names)))
        if before is not None:
            series.append(Series(label + " (before fix)", color,
                                 _values(before, order, stat, names), dashed=True))
    return series


def _label(report: Report) -> str:
    return report.model.path or f"sha256:{report.model.sha256[:16]}"


def _counts(report: Report) -> str:
    s = report.summary
    return (f"{_badge(Severity.ERROR, s.error)} {_badge(Severity.WARNING, s.warning)} "
            f"{_badge(Severity.INFO, s.info)}")


def _badge(severity: Severity, count: int) -> str:
    return f'<span class="badge {severity.value}">{count} {severity.value}</span>'


def _tag(severity: Severity) -> str:
    return f'<span class="badge {severity.value}">{severity.value}</span>'


def _meta(report: Report, before: Report | None = None) -> str:
    m = report.model
    inputs = ", ".join(f"{i.name} {'x'.join(map(str, i.shape))} {i.dtype} ({i.source})"
                       for i in m.inputs)
    rows = [("format", m.format), ("sha256", m.sha256), ("size", f"{m.size_bytes:,} bytes"),
            ("inputs", inputs), ("device", report.device), ("seed", str(report.seed)),
            ("time", f"{report.timing.total_s:.2f} s (load {report.timing.load_s:.2f}, "
                     f"probe {report.timing.probe_s:.2f}, rules {report.timing.rules_s:.2f})")]
    if before is not None:
        rows.insert(0, ("fixed from", f"{_label(before)} (sha256 {before.model.sha256[:16]})"))
    table = "".join(f"<tr><th>{k}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    notes = "".join(f"<li>{escape(n)}</li>" for n in m.notes)
    return f'<table class="meta">{table}</table>' + (f'<ul class="notes">{notes}</ul>'
                                                      if notes else "")


def _flags(report: Report) -> dict[str, list[Finding]]:
    flagged: dict[str, list[Finding]] = {}
    for finding in report.findings:
        flagged.setdefault(finding.layer, []).append(finding)
    return flagged


def _worst(findings: list[Finding]) -> Severity:
    return max((f.severity for f in findings), key=lambda s: s.rank)


def _anchor(index: int, layer: str) -> str:
    # Ids from model strings: keep them to a safe alphabet, and unique per model section.
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in layer)
    return f"m{index}-layer-{safe}"


def _findings_table(findings: list[Finding], index: int) -> str:
    if not findings:
        return '<p class="clean">No findings.</p>'
    rows = []
    for f in sorted(findings, key=lambda f: -f.severity.rank):
        fix = ""
        if f.fix is not None:
            scheme = escape(fix_sentence(f.fix.model_copy(update={"code": "", "advice": ""})))
            code = f"<pre><code>{_breakable(f.fix.code)}</code></pre>" if f.fix.code else ""
            advice = f"<p>{escape(f.fix.advice)}</p>" if f.fix.advice else ""
            fix = (f"<p>{scheme}</p>" if scheme else "") + code + advice
        evidence = ", ".join(f"{escape(k)}={escape(_num_text(v))}" for k, v in f.evidence.items())
        rows.append(
            f'<tr class="{f.severity.value}"><td>{_tag(f.severity)}</td>'
            f"<td><code>{escape(f.rule)}</code></td>"
            f'<td><a href="#{_anchor(index, f.layer)}"><code>{escape(f.layer)}</code></a></td>'
            f"<td>{escape(f.message)}<div class=\"evidence\">{evidence}</div></td>"
            f"<td>{fix}</td></tr>")
    return ('<table class="findings"><thead><tr><th>severity</th><th>rule</th><th>layer</th>'
            "<th>finding</th><th>fix</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _breakable(code: str) -> str:
    """Escaped code with line-break opportunities after `(`, `,` and before `#`, so a long
    line wraps between arguments, never inside an identifier or a number."""
    out = escape(code)
    for mark in ("(", ", "):
        out = out.replace(mark, mark + "<wbr>")
    return out.replace("  #", "  <wbr>#")


def _resolved(before: Report, after: Report) -> list[Finding]:
    remaining = {f.fingerprint for f in after.findings}
    return [f for f in before.findings if f.fingerprint not in remaining]


def _resolved_list(resolved: list[Finding]) -> str:
    if not resolved:
        return ""
    items = "".join(f"<li>{escape(f.severity.value)} <code>{escape(f.rule)}</code> at "
                    f"<code>{escape(f.layer)}</code>: {escape(f.message)}</li>" for f in resolved)
    return f'<h3>Resolved by the fix ({len(resolved)})</h3><ul class="resolved">{items}</ul>'


def _layer_table(report: Report, flagged: dict[str, list[Finding]], index: int) -> str:
    rows = []
    for depth, layer in enumerate(report.layers):
        act, grad = layer.activation, layer.gradient
        mark = ""
        if layer.name in flagged:
            worst = _worst(flagged[layer.name])
            rules = ", ".join(sorted({f.rule for f in flagged[layer.name]}))
            mark = f'<span class="badge {worst.value}">{escape(rules)}</span>'
        rows.append(
            f'<tr id="{_anchor(index, layer.name)}"><td>{depth}</td>'
            f"<td><code>{escape(layer.name)}</code></td><td>{escape(layer.op)}</td>"
            f"<td>{escape(layer.role)}</td>"
            f"<td>{_num_text(act.var) if act else '-'}</td>"
            f"<td>{_num_text(act.dead_units) if act else '-'}</td>"
            f"<td>{_num_text(grad.rms) if grad else '-'}</td><td>{mark}</td></tr>")
    return ("<details><summary>Layers</summary><table class=\"layers\"><thead><tr><th>#</th>"
            "<th>layer</th><th>op</th><th>role</th><th>act. variance</th><th>dead units</th>"
            "<th>grad rms</th><th>findings</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></details>")


def _num_text(value: object) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


# ---------------------------------------------------------------- plots

@dataclass
class Series:
    name: str
    color: str
    values: list[float | None]  # one per depth position; None: not measured there
    dashed: bool = False


def _depth_order(report: Report, before: Report | None) -> list[str]:
    """Layer names on the x axis: the report's measured layers in graph order, then any layer
    only the `before` report measured."""
    order = [layer.name for layer in report.layers if _measured(layer)]
    if before is not None:
        seen = set(order)
        order += [layer.name for layer in before.layers
                  if _measured(layer) and layer.name not in seen]
    return order


def _measured(layer: LayerReport) -> bool:
    return layer.activation is not None or layer.gradient is not None


def _values(report: Report, order: list[str], stat: str,
            names: set[str] | None = None) -> list[float | None]:
    """`stat` of each layer in `order` ("var": activation variance, "rms": grad rms); None
    where the layer was not measured or is not one of `names`."""
    by_name: dict[str, float] = {}
    for layer in report.layers:
        source = layer.activation if stat == "var" else layer.gradient
        if source is not None and layer.name not in by_name:
            by_name[layer.name] = getattr(source, stat)
    return [by_name.get(name) if names is None or name in names else None for name in order]


def _plot(title: str, series: Sequence[Series], order: list[str],
          flagged: dict[str, list[Finding]],
          earlier: dict[str, list[Finding]] | None = None) -> str:
    """`flagged`: layers with findings now; `earlier`: layers flagged before a fix, drawn in
    grey where nothing is flagged any more."""
    earlier = {name: f for name, f in (earlier or {}).items() if name not in flagged}
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    positive = [v for s in series for v in s.values
                if v is not None and math.isfinite(v) and v > 0]
    if not order or not positive:
        return (f'<figure class="plot"><figcaption>{escape(title)}</figcaption>'
                f'<p class="empty">nothing measured</p></figure>')
    lo = math.floor(math.log10(min(positive)))
    hi = math.ceil(math.log10(max(positive)))
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    zeros = any(v == 0 for s in series for v in s.values if v is not None)
    if zeros:  # one decade more below: the labelled zero line sits under the lowest value
        lo -= 1
    count = len(order)

    def x_of(i: int) -> float:
        return LEFT + (plot_w * (i + 0.5) / count)

    def y_of(value: float) -> float:
        return TOP + plot_h * (hi - math.log10(value)) / (hi - lo)

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    step = max(1, math.ceil((hi - lo) / 8))
    for exponent in range(lo, hi + 1, step):  # one grid line per decade (or per few)
        if zeros and exponent == lo:
            continue  # that place is the zero line's
        y = y_of(10.0 ** exponent)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'class="grid"/><text x="{LEFT - 6}" y="{y + 4:.1f}" class="ytick">10'
                     f'<tspan dy="-7" font-size="10">{exponent}</tspan></text>')
    # The x axis names layers: every flagged one, and the first and last for orientation
    # (all of them when few enough to stay legible), rotated to fit under the axis.
    named = ({i for i, name in enumerate(order) if name in flagged or name in earlier}
             | {0, count - 1})
    if count <= 24:
        named = set(range(count))
    for i in sorted(named):
        name = order[i]
        shown = name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"
        cls = "xname flagged" if name in flagged else "xname"
        fill = f' style="fill:{COLORS[_worst(flagged[name])]}"' if name in flagged else ""
        x, y = x_of(i), TOP + plot_h + 10
        parts.append(f'<text x="{x:.1f}" y="{y}" class="{cls}"{fill} transform="rotate(-40 '
                     f'{x:.1f} {y})">{escape(shown)}<title>{escape(name)} (#{i})</title></text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" class="axis">layer, '
                 f'in graph order ({count} measured)</text>')
    # Zero cannot sit on a log axis: zeros are drawn on a labelled floor line under the lowest
    # decade, NaN/Inf on a labelled line above the highest.
    floor_y, ceiling_y = TOP + plot_h - 6, TOP + 6
    values = [v for s in series for v in s.values if v is not None]
    if zeros:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{floor_y}" y2="{floor_y}" '
                     f'class="floor"/><text x="{LEFT - 6}" y="{floor_y + 4}" class="ytick">0'
                     f'</text>')
    if any(not math.isfinite(v) for v in values):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ceiling_y}" '
                     f'y2="{ceiling_y}" class="floor"/><text x="{LEFT - 6}" y="{ceiling_y + 4}" '
                     f'class="ytick">nan</text>')

    for i, name in enumerate(order):  # flagged layers: a band in the worst severity's colour
        if name in flagged or name in earlier:
            findings = flagged.get(name) or earlier[name]
            color = COLORS[_worst(findings)] if name in flagged else BEFORE
            prefix = f"{name}: " if name in flagged else f"{name} (before fix): "
            tip = escape(prefix + "; ".join(f"{f.severity.value} {f.rule}" for f in findings))
            parts.append(f'<g class="flag"><title>{tip}</title><line x1="{x_of(i):.1f}" '
                         f'x2="{x_of(i):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="{color}" '
                         f'stroke-width="2" stroke-dasharray="4 3"/><path d="M{x_of(i) - 5:.1f},'
                         f'{TOP - 10} h10 l-5,8 z" fill="{color}"/></g>')

    # "After" (solid, translucent) first, "before" (dashed) over it: both stay visible.
    for s in sorted(series, key=lambda s: s.dashed):
        style = (' stroke-width="2.5" stroke-dasharray="6 4" stroke-opacity="0.9"' if s.dashed
                 else ' stroke-width="2" stroke-opacity="0.75"')
        for run in _runs(s.values):  # a line breaks where a value cannot sit on a log axis
            points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in run)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{s.color}"{style}/>')
        for i, value in enumerate(s.values):
            if value is None:
                continue
            tip = escape(f"{order[i]} ({s.name}): {_num_text(value)}")
            if math.isfinite(value) and value > 0:
                parts.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(value):.1f}" r="3.2" '
                             f'fill="{s.color}"><title>{tip}</title></circle>')
            else:  # zero on the floor line, NaN/Inf on the ceiling line
                y = floor_y if value == 0 else ceiling_y
                parts.append(f'<text x="{x_of(i):.1f}" y="{y + 4:.1f}" class="offscale" '
                             f'fill="{s.color}">{"0" if value == 0 else "!"}'
                             f"<title>{tip}</title></text>")

    legend_x = LEFT + 8
    for s in series:
        if s.dashed:  # one legend entry per kind; the dash is explained once
            continue
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{TOP - 36}" '
                     f'y2="{TOP - 36}" stroke="{s.color}" stroke-width="2"/><text '
                     f'x="{legend_x + 26}" y="{TOP - 32}" class="legend">'
                     f'{escape(s.name.removesuffix(" (after fix)"))}</text>')
        legend_x += 40 + 7 * len(s.name.removesuffix(" (after fix)"))
    if any(s.dashed for s in series):
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 22}" y1="{TOP - 36}" '
                     f'y2="{TOP - 36}" stroke="{BEFORE}" stroke-width="2.5" '
                     f'stroke-dasharray="6 4"/><text x="{legend_x + 26}" y="{TOP - 32}" '
                     f'class="legend">dashed: before fix</text>')
        legend_x += 175
    if any(name in flagged or name in earlier for name in order):
        label = "flagged" if not earlier else "flagged (grey: before the fix)"
        parts.append(f'<text x="{legend_x}" y="{TOP - 32}" class="legend">▼ {label}</text>')
    aria = escape(f"{title}, log scale, {count} layers")
    return (f'<figure class="plot"><figcaption>{escape(title)} (log scale)</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'role="img" aria-label="{aria}">' + "".join(parts) + "</svg></figure>")


def _runs(values: list[float | None]) -> list[list[tuple[int, float]]]:
    """Stretches of drawable values; positions of other kinds (None) are stepped over, a zero
    or non-finite value breaks the line."""
    runs: list[list[tuple[int, float]]] = [[]]
    for i, value in enumerate(values):
        if value is None:
            continue
        if math.isfinite(value) and value > 0:
            runs[-1].append((i, value))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if len(run) > 1]


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#212121;background:#fafafa}
header,main,footer{max-width:1100px;margin:0 auto;padding:12px 20px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:24px 0 8px;word-break:break-all}h3{font-size:15px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:4px 18px 16px;margin:16px 0}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;color:#fff;background:#757575}
.badge.error{background:#c62828}.badge.warning{background:#ef6c00}.badge.info{background:#1565c0}
.nav{padding-left:18px}.nav a{word-break:break-all}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{text-align:left;vertical-align:top;padding:4px 8px;border-bottom:1px solid #eee}
table.meta{width:auto}table.meta th{color:#616161;font-weight:normal}table.meta td{word-break:break-all}
tr.error td:first-child{border-left:3px solid #c62828}tr.warning td:first-child{border-left:3px solid #ef6c00}tr.info td:first-child{border-left:3px solid #1565c0}
pre{background:#f5f5f5;padding:6px 8px;border-radius:4px;white-space:pre-wrap;word-break:normal;overflow-wrap:normal;overflow-x:auto;margin:4px 0}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.evidence{color:#616161;font-size:12px}.clean{color:#2e7d32}
.plots{display:flex;flex-wrap:wrap;gap:12px}figure.plot{margin:0;flex:1 1 480px}
figcaption{font-weight:600;margin:4px 0}svg{width:100%;height:auto;background:#fff}
.frame{fill:none;stroke:#bdbdbd}.grid{stroke:#eeeeee}
.ytick{font-size:13px;text-anchor:end;fill:#616161}.xtick{font-size:12px;text-anchor:middle;fill:#757575}
.axis{font-size:13px;text-anchor:middle;fill:#616161}.legend{font-size:13px;fill:#424242}
.offscale{font-size:14px;font-weight:700;text-anchor:middle}
.xname{font-size:11px;text-anchor:end;fill:#757575}.xname.flagged{font-weight:600}
.floor{stroke:#9e9e9e;stroke-dasharray:2 3}
details summary{cursor:pointer;margin:10px 0;font-weight:600}
footer{color:#757575;font-size:12px}
"""
