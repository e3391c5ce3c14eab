"""Run the selected rules over a probe result, in a stable order."""

from __future__ import annotations

from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding
from gradprobe.diagnostics.rules import Rule, all_rules, rule_named


def selected_rules(options: DiagnoseOptions) -> list[Rule]:
    for name in [*(options.select or []), *options.ignore, *options.severities,
                 *options.thresholds]:
        rule_named(name)  # unknown names are a clear ConfigError, not a silent no-op
    chosen = [r for r in all_rules()
              if (options.select is None or r.name in options.select) and r.name not in options.ignore]
    return [r(options.thresholds.get(r.name), options.severities.get(r.name)) for r in chosen]


def run_rules(probe: ProbeResult, rules: list[Rule]) -> list[Finding]:
    order = {lp.point.layer: i for i, lp in enumerate(probe.layers)}
    findings = [f for rule in rules for f in rule.check(probe)]
    # Worst first, then in the order the layers run: what to fix first reads first.
    return sorted(findings, key=lambda f: (-f.severity.rank, order.get(f.layer, len(order)), f.rule))
