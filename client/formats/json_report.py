"""`--format json`: the report contract itself. One file: its report (`gradprobe.report/v1`).
Several files, or any file that could not be linted: one envelope (`gradprobe.reports/v1`,
documented in docs/report-schema.md) with the reports, the files that failed and the files a
folder walk skipped."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradprobe.diagnostics.report import Report

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

ENVELOPE_SCHEMA = "gradprobe.reports/v1"


def render(reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
    if len(reports) == 1 and not unlinted:
        return reports[0].to_json()
    items = [json.loads(r.to_json(indent=None)) for r in reports]
    envelope = {
        "schema": ENVELOPE_SCHEMA,
        "reports": items,
        "errors": [{"path": u.path, "message": u.reason} for u in unlinted if u.failed],
        "skipped": [{"path": u.path, "kind": u.kind, "reason": u.reason}
                    for u in unlinted if not u.failed],
    }
    return json.dumps(envelope, indent=2)
