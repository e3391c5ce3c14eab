"""Output formats. Each format is a module here with
`render(reports: list[Report], *, fail_on: str, unlinted: Sequence[Unlinted] = ()) -> str`;
one report per linted model file, and one `Unlinted` per file that was not: a file that failed
(exit code 2) or one a folder walk passed over (not a model). Every format shows both in the
way its consumer expects."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Unlinted:
    """A file with no report: `failed` (could not be loaded or probed: exit code 2) or
    skipped by a folder walk (weights only, safetensors, ...)."""

    path: str
    reason: str  # one line
    failed: bool
    kind: str = ""  # for skipped files: a few words to group them by


def render(fmt: str, reports: list[Report], *, fail_on: str = "error",
           unlinted: Sequence[Unlinted] = ()) -> str:
    module = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
    return module.render(reports, fail_on=fail_on, unlinted=unlinted)


def skipped_summary(unlinted: Sequence[Unlinted]) -> str:
    """`skipped 3 files (2 weights-only checkpoint, 1 safetensors weights)`, or ''."""
    skipped = [u for u in unlinted if not u.failed]
    if not skipped:
        return ""
    kinds: dict[str, int] = {}
    for item in skipped:
        kinds[item.kind or "not a model"] = kinds.get(item.kind or "not a model", 0) + 1
    why = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
    return f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} ({why})"
