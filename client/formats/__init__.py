"""Output formats. Each format is a module here with
`render(reports: list[Report], *, fail_on: str) -> str`; one report per linted model file."""

from __future__ import annotations

import importlib

from gradprobe.diagnostics.report import Report

# format name -> module in this package
FORMATS: dict[str, str] = {
    "text": "text",
    "json": "json_report",
    "sarif": "sarif",
    "junit": "junit",
    "github": "github",
    "gitlab": "gitlab",
}


def render(fmt: str, reports: list[Report], *, fail_on: str = "error") -> str:
    module = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
    return module.render(reports, fail_on=fail_on)
