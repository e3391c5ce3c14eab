"""`--format json`: the report contract itself. Several files: a list under one envelope."""

from __future__ import annotations

import json

from gradprobe.diagnostics.report import Report


def render(reports: list[Report], *, fail_on: str = "error") -> str:
    if len(reports) == 1:
        return reports[0].to_json()
    items = [json.loads(r.to_json(indent=None)) for r in reports]
    return json.dumps({"schema": "gradprobe.reports/v1", "reports": items}, indent=2)
