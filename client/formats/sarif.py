"""SARIF 2.1.0, the static-analysis exchange format GitHub code scanning (and most security
dashboards) ingest. One run for the whole invocation; every rule in the catalogue is described
in `tool.driver.rules` so a viewer can explain any rule id; one result per finding, located in
the model file (physical location) and at the layer and graph nodes (logical locations).

Output is deterministic (no timestamps, stable order) so two runs on the same models produce
byte-identical files and code scanning tracks alerts by `partialFingerprints`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

import gradprobe
from gradprobe.client.formats._shared import (
    finding_text,
    fingerprinted,
    json_safe,
    model_path,
    relative_path,
    rule_docs,
)
from gradprobe.diagnostics.report import Finding, Report, Severity
from gradprobe.diagnostics.rules.base import RuleDoc

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
FINGERPRINT_KEY = "gradprobeFinding/v1"

LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def render(reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
    # `fail_on` does not change SARIF: levels travel as they are and the consumer decides.
    docs = {doc.name: doc for doc in rule_docs()}
    for report in reports:  # a finding from a rule outside the catalogue still needs an entry
        for finding in report.findings:
            docs.setdefault(finding.rule, _undocumented(finding))
    ordered = sorted(docs.values(), key=lambda doc: doc.name)
    rule_index = {doc.name: i for i, doc in enumerate(ordered)}

    artifacts, results = [], []
    for report in reports:
        model = model_path(report)
        artifact = _artifact_location(model)
        artifact["index"] = len(artifacts)
        artifacts.append({
            "location": {k: v for k, v in artifact.items() if k != "index"},
            "length": report.model.size_bytes,
            "hashes": {"sha-256": report.model.sha256},
            "properties": {"format": report.model.format},
        })
        for finding, fingerprint in fingerprinted(report, model):
            results.append(_result(finding, fingerprint, artifact, rule_index[finding.rule]))

    log = {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "gradprobe",
                "version": gradprobe.__version__,
                "semanticVersion": gradprobe.__version__,
                "rules": [_descriptor(doc) for doc in ordered],
            }},
            "artifacts": artifacts,
            "results": results,
            "invocations": [_invocation(unlinted)],
        }],
    }
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


def _invocation(unlinted: Sequence[Unlinted]) -> dict:
    """A file that could not be linted is a failure of the tool's run on it (SARIF: a
    toolExecutionNotification, and the run not successful); a skipped file is a note."""
    notes = []
    for item in unlinted:
        path = relative_path(item.path)
        notes.append({
            "level": "error" if item.failed else "note",
            "message": {"text": f"{path}: {item.reason}" if item.failed
                        else f"{path}: skipped ({item.kind}): {item.reason}"},
            "locations": [{"physicalLocation": {"artifactLocation": _artifact_location(path)}}],
            "descriptor": {"id": "gradprobe/load-error" if item.failed else "gradprobe/skipped"},
        })
    invocation: dict = {"executionSuccessful": not any(u.failed for u in unlinted)}
    if notes:
        invocation["toolExecutionNotifications"] = notes
    return invocation


def _artifact_location(model: str) -> dict:
    if model.startswith("/"):  # outside the working tree: an absolute file URI
        return {"uri": "file://" + quote(model)}
    # Relative to the checkout root, which is what code scanning resolves %SRCROOT% to.
    return {"uri": quote(model), "uriBaseId": "%SRCROOT%"}


def _descriptor(doc: RuleDoc) -> dict:
    summary = doc.summary or doc.name
    full = " ".join(part for part in (summary, doc.why) if part)
    return {
        "id": doc.name,
        "name": "".join(word.capitalize() for word in doc.name.split("-")),
        "shortDescription": {"text": summary},
        "fullDescription": {"text": full},
        "help": {"text": doc.full_text(), "markdown": _help_markdown(doc)},
        "defaultConfiguration": {"level": LEVELS[doc.severity]},
        "properties": {"tags": ["gradprobe", "initialisation"],
                       "thresholds": dict(sorted(doc.defaults.items()))},
    }


def _help_markdown(doc: RuleDoc) -> str:
    lines = [f"**{doc.name}** ({doc.severity.value}): {doc.summary}"]
    for title, text in (("Why it matters", doc.why), ("Example", doc.example),
                        ("Fix", doc.fix), ("Thresholds", doc.thresholds)):
        if text:
            lines += ["", f"### {title}", "", text]
    return "\n".join(lines)


def _undocumented(finding: Finding) -> RuleDoc:
    return RuleDoc(finding.rule, finding.severity, finding.rule, "", "", "", "")


def _result(finding: Finding, fingerprint: str, artifact: dict, index: int) -> dict:
    layer = {"name": finding.layer, "fullyQualifiedName": finding.layer, "kind": "module"}
    if finding.nodes:
        layer["decoratedName"] = finding.nodes[0]  # the name the layer carries in the file
    # An ONNX/TorchScript node is one call of an operator: SARIF's closest kind is "function".
    nodes = [{"name": node, "fullyQualifiedName": node, "kind": "function"}
             for node in finding.nodes]
    properties = {"severity": finding.severity.value, "layer": finding.layer,
                  "nodes": finding.nodes, "parameters": finding.parameters,
                  "evidence": json_safe(finding.evidence)}
    if finding.fix is not None:
        properties["fix"] = json_safe(finding.fix.model_dump(exclude_defaults=True))
    return {
        "ruleId": finding.rule,
        "ruleIndex": index,
        "level": LEVELS[finding.severity],
        "message": {"text": f"{finding.layer}: {finding_text(finding)}"},
        "locations": [{
            # Model files are binary: line 1 is where code scanning anchors the alert.
            "physicalLocation": {"artifactLocation": artifact, "region": {"startLine": 1}},
            "logicalLocations": [layer, *nodes],
        }],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint},
        "properties": properties,
    }
