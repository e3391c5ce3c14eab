"""GitLab Code Quality report: a JSON array of issues (CodeClimate subset) that GitLab shows in
merge requests when a job uploads it as `artifacts:reports:codequality`. Each issue needs a
description, check_name, a fingerprint unique in the report, a severity of info/minor/major/
critical/blocker, and a location with path and begin line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradprobe.client.formats._shared import (
    finding_text,
    fingerprinted,
    fix_sentence,
    model_path,
    relative_path,
    unlinted_fingerprint,
)
from gradprobe.diagnostics.report import Finding, Report, Severity

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

# A network that cannot learn is a major defect; warnings are minor; info is info.
SEVERITIES = {Severity.ERROR: "major", Severity.WARNING: "minor", Severity.INFO: "info"}


def render(reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
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
    for item in unlinted:  # a file that could not be linted blocks; a skipped one informs
        path = relative_path(item.path)
        issues.append({
            "type": "issue",
            "engine_name": "gradprobe",
            "check_name": "gradprobe/load-error" if item.failed else "gradprobe/skipped",
            "description": (f"gradprobe could not lint this file: {item.reason}" if item.failed
                            else f"gradprobe skipped this file ({item.kind}): {item.reason}"),
            "categories": ["Bug Risk"],
            "severity": "blocker" if item.failed else "info",
            "fingerprint": unlinted_fingerprint(item),
            "location": {"path": path, "lines": {"begin": 1}},
        })
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
