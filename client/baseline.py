"""Baselines let a team adopt gradprobe on an existing model zoo: record today's findings once
(`--write-baseline FILE`), then report only findings that are not in the record
(`--baseline FILE`).

A finding is identified by its rule, layer and parameters (`Finding.fingerprint`: no measured
numbers, no wording) and by the model's path relative to the baseline file's directory, so the
file can be committed and gives the same answer on every machine and after re-exports of the
same architecture. Matching counts occurrences: if the baseline holds one dead-relu at `net.4`,
a second identical one is new."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradprobe.client.formats._shared import located_fingerprint, model_path
from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.report import Report, Severity, Summary

BASELINE_SCHEMA = "gradprobe.baseline/v1"


class BaselineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    model: str  # forward-slash path relative to the baseline file's directory
    rule: str
    layer: str
    severity: Severity
    message: str = ""  # for people reading the file; not used to match
    model_sha256: str | None = None


class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(BASELINE_SCHEMA, alias="schema")
    entries: list[BaselineEntry] = Field(default_factory=list)
    # Directory model paths are relative to: the baseline file's own directory.
    root: Path = Field(default_factory=Path.cwd, exclude=True)

    def counts(self) -> Counter[str]:
        return Counter(entry.fingerprint for entry in self.entries)


def build_baseline(reports: list[Report], root: Path) -> Baseline:
    entries = []
    for report in reports:
        model = model_path(report, root)
        for finding in report.findings:
            entries.append(BaselineEntry(
                fingerprint=located_fingerprint(model, finding), model=model,
                rule=finding.rule, layer=finding.layer, severity=finding.severity,
                message=finding.message, model_sha256=report.model.sha256))
    entries.sort(key=lambda e: (e.model, e.rule, e.layer, e.fingerprint))
    return Baseline(entries=entries, root=root.resolve())


def write_baseline(path: Path, reports: list[Report]) -> Baseline:
    """Record every finding of `reports` in `path` (sorted, so the file diffs cleanly)."""
    baseline = build_baseline(reports, path.resolve().parent)
    try:
        path.write_text(baseline.model_dump_json(by_alias=True, indent=2) + "\n",
                        encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write baseline: {exc.strerror or exc}") from None
    return baseline


def read_baseline(path: Path) -> Baseline:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: baseline file not found "
                          f"(create it with --write-baseline {path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable baseline: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        raise ConfigError(f"{path}: not a gradprobe baseline (expected schema "
                          f"{BASELINE_SCHEMA!r})")
    try:
        baseline = Baseline.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"{path}: bad baseline entry at {where}: {error['msg']}") from None
    return baseline.model_copy(update={"root": path.resolve().parent})


def filter_new(reports: list[Report], baseline: Baseline) -> list[Report]:
    """The same reports with only the findings the baseline does not account for; summaries
    are recounted so exit codes and formats see only new findings."""
    remaining = baseline.counts()
    filtered = []
    for report in reports:
        model = model_path(report, baseline.root)
        kept = []
        for finding in report.findings:
            fingerprint = located_fingerprint(model, finding)
            if remaining[fingerprint] > 0:
                remaining[fingerprint] -= 1
            else:
                kept.append(finding)
        counts = Counter(finding.severity.value for finding in kept)
        filtered.append(report.model_copy(update={"findings": kept,
                                                  "summary": Summary(**counts)}))
    return filtered


def suppressed_count(before: list[Report], after: list[Report]) -> int:
    return sum(len(b.findings) - len(a.findings) for b, a in zip(before, after))
