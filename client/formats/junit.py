"""JUnit XML, the test-report format every CI system shows (GitLab, Jenkins, Azure, CircleCI).

One <testsuite> per model file. Inside it, one <testcase> per rule and layer that the rule
reported on (a <failure> when a finding there is at or above --fail-on, a pass with the
finding in <system-out> otherwise), and one passing <testcase> per rule that reported nothing,
so the dashboard shows which checks ran and stayed green."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradprobe.client.formats._shared import (
    at_or_above,
    finding_text,
    fix_sentence,
    model_path,
    relative_path,
    rule_docs,
)
from gradprobe.diagnostics.report import Finding, Report

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

# Characters XML 1.0 forbids even when escaped; a model may carry them in node names.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def render(reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
    rules = [doc.name for doc in rule_docs()]
    root = ET.Element("testsuites", name="gradprobe")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for report in reports:
        suite = _suite(report, rules, fail_on)
        root.append(suite)
        totals["tests"] += int(suite.get("tests", "0"))
        totals["failures"] += int(suite.get("failures", "0"))
        total_time += report.timing.total_s
    for item in unlinted:  # a file that failed is an error of its suite; a skipped one, skipped
        root.append(_unlinted_suite(item))
        totals["tests"] += 1
        totals["errors" if item.failed else "skipped"] += 1
    root.set("tests", str(totals["tests"]))
    root.set("failures", str(totals["failures"]))
    root.set("errors", str(totals["errors"]))
    root.set("skipped", str(totals["skipped"]))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _suite(report: Report, rules: list[str], fail_on: str) -> ET.Element:
    model = model_path(report)
    suite = ET.Element("testsuite", name=_clean(model), time=f"{report.timing.total_s:.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in (("format", report.model.format), ("sha256", report.model.sha256),
                        ("device", report.device), ("seed", str(report.seed)),
                        ("fail-on", fail_on)):
        ET.SubElement(props, "property", name=name, value=_clean(value))

    depth = {layer.name: i for i, layer in enumerate(report.layers)}
    grouped: dict[tuple[str, str], list[Finding]] = {}
    for finding in report.findings:
        grouped.setdefault((finding.rule, finding.layer), []).append(finding)
    reported = {rule for rule, _ in grouped}

    cases = 0
    failures = 0
    for rule in sorted(set(rules) | reported):
        if rule not in reported:
            ET.SubElement(suite, "testcase", classname=_clean(model), name=rule, file=_clean(model))
            cases += 1
            continue
        layers = sorted((layer for r, layer in grouped if r == rule),
                        key=lambda name: (depth.get(name, len(depth)), name))
        for layer in layers:
            findings = grouped[(rule, layer)]
            case = ET.SubElement(suite, "testcase", classname=_clean(model),
                                 name=_clean(f"{rule}: {layer}"), file=_clean(model))
            cases += 1
            details = "\n\n".join(_details(f) for f in findings)
            failing = [f for f in findings if at_or_above(f.severity, fail_on)]
            if failing:
                worst = max(failing, key=lambda f: f.severity.rank)
                failure = ET.SubElement(case, "failure", message=_clean(finding_text(worst)),
                                        type=worst.severity.value)
                failure.text = _clean(details)
                failures += 1
            else:
                ET.SubElement(case, "system-out").text = _clean(details)
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    return suite


def _unlinted_suite(item: Unlinted) -> ET.Element:
    path = _clean(relative_path(item.path))
    suite = ET.Element("testsuite", name=path, tests="1", failures="0",
                       errors="1" if item.failed else "0", skipped="0" if item.failed else "1",
                       time="0.000")
    case = ET.SubElement(suite, "testcase", classname=path, name="load" if item.failed
                         else "skipped", file=path)
    if item.failed:
        error = ET.SubElement(case, "error", message=_clean(item.reason), type="load-error")
        error.text = _clean(item.reason)
    else:
        ET.SubElement(case, "skipped", message=_clean(f"{item.kind}: {item.reason}"))
    return suite


def _details(finding: Finding) -> str:
    lines = [f"{finding.severity.value}: {finding.rule} at {finding.layer}", finding.message]
    if finding.nodes:
        lines.append("nodes: " + ", ".join(finding.nodes))
    if finding.parameters:
        lines.append("parameters: " + ", ".join(finding.parameters))
    if finding.evidence:
        lines.append("evidence: " + ", ".join(f"{k}={v}" for k, v in finding.evidence.items()))
    fix = fix_sentence(finding.fix)
    if fix:
        lines.append("fix: " + fix)
    return "\n".join(lines)


def _clean(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)
