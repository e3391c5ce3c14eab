"""GitHub Actions workflow commands: each finding becomes an annotation on the model file
(`::error file=...,title=...::message`), shown on the run summary and the pull request.

Escaping follows the runner's rules: in the message `%`, CR and LF are percent-encoded; in
property values `:` and `,` are too, since they delimit properties. A plain summary line closes
the output (the runner shows only the first few annotations of each level per step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradprobe.client.formats._shared import finding_text, model_path, relative_path
from gradprobe.diagnostics.report import Report, Severity

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

COMMANDS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render(reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
    lines = []
    counts = dict.fromkeys(Severity, 0)
    for report in reports:
        model = model_path(report)
        for finding in report.findings:
            counts[finding.severity] += 1
            title = f"gradprobe {finding.rule} ({finding.layer})"
            message = f"{finding.layer}: {finding_text(finding)}"
            lines.append(f"::{COMMANDS[finding.severity]} file={escape_property(model)},"
                         f"title={escape_property(title)}::{escape_data(message)}")
    for item in unlinted:
        path = relative_path(item.path)
        if item.failed:
            lines.append(f"::error file={escape_property(path)},"
                         f"title={escape_property('gradprobe could not lint this file')}::"
                         f"{escape_data(item.reason)}")
        else:
            lines.append(f"::notice file={escape_property(path)},"
                         f"title={escape_property(f'gradprobe skipped this file ({item.kind})')}"
                         f"::{escape_data(item.reason)}")
    failed = sum(u.failed for u in unlinted)
    skipped = len(unlinted) - failed
    tail = (f"; {failed} file(s) could not be linted" if failed else "") + (
        f"; {skipped} file(s) skipped" if skipped else "")
    lines.append(f"gradprobe: {counts[Severity.ERROR]} error(s), "
                 f"{counts[Severity.WARNING]} warning(s), {counts[Severity.INFO]} info "
                 f"in {len(reports)} model(s){tail}; failing on {fail_on}")
    return "\n".join(lines) + "\n"
