"""GitLab Code Quality report: a JSON array of issues (CodeClimate subset) that GitLab shows in
merge requests when a job uploads it as `artifacts:reports:codequality`. Each issue needs a
description, check_name, a fingerprint unique in the report, a severity of info/minor/major/
critical/blocker, and a location with path and begin line."""

from __future__ import annotations

import json

from gradprobe.client.formats._shared import (
    finding_text,
    fingerprinted,
    fix_sentence,
    model_path,
)
from gradprobe.diagnostics.report import Finding, Report, Severity

# A network that cannot learn is a major defect; warnings are minor; info is info.
SEVERITIES = {Severity.ERROR: "major", Severity.WARNING: "minor", Severity.INFO: "info"}


def render(reports: list[Report], *, fail_on: str = "error") -> str:
    issues = []
    for report in reports:
        model = model_path(report)
        for finding, fingerprint in fingerprinted(report, model):
            issue = {
                "type": "issue",
                "engine_name": "gradprobe",
                "check_name": finding.rule,
                "description": f"{finding.layer}: {finding_text(finding)}",
                "categories": ["Bug Risk"],
                "severity": SEVERITIES[finding.severity],
                "fingerprint": fingerprint,
                "location": {"path": model, "lines": {"begin": 1}},
                "content": {"body": _body(finding)},
            }
            issues.append(issue)
    return json.dumps(issues, indent=2, ensure_ascii=False) + "\n"


def _body(finding: Finding) -> str:
    """The issue's detail pane: where in the graph, what was measured, and the fix."""
    lines = [finding.message]
    if finding.nodes:
        lines.append("Nodes: " + ", ".join(f"`{node}`" for node in finding.nodes))
    if finding.parameters:
        lines.append("Parameters: " + ", ".join(f"`{name}`" for name in finding.parameters))
    if finding.evidence:
        lines.append("Evidence: " + ", ".join(f"{k}={v}" for k, v in finding.evidence.items()))
    fix = fix_sentence(finding.fix)
    if fix:
        lines.append(f"Fix: {fix}")
    return "\n\n".join(lines)
