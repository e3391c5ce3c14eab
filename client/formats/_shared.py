"""Pieces every CI-facing format needs: where a model file is (relative to the repository the
job runs in), a finding's identity across runs, the rule catalogue, and a fix in one sentence."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradprobe.diagnostics.report import Finding, Fix, Report, Severity
from gradprobe.diagnostics.rules.base import RuleDoc

if TYPE_CHECKING:
    from gradprobe.client.formats import Unlinted

FAIL_ON_CHOICES = ("error", "warning", "info", "never")


def rule_docs() -> list[RuleDoc]:
    """Every rule's documentation, sorted by name (SARIF lists all rules, not only those that
    fired, so a code-scanning UI can explain any of them)."""
    from gradprobe.diagnostics.rules import all_rules

    return sorted((rule.doc() for rule in all_rules()), key=lambda doc: doc.name)


def model_path(report: Report, base: Path | None = None) -> str:
    """The model file as a forward-slash path relative to `base` (default: the working
    directory) when it lies below it, else absolute. CI systems match these against the files
    of the checked-out repository, which is the working directory of the job."""
    if report.model.path is None:  # uploaded bytes without a name (server)
        return f"sha256-{report.model.sha256[:16]}"
    return relative_path(report.model.path, base)


def relative_path(given: str, base: Path | None = None) -> str:
    """A file path as CI systems want it (see model_path)."""
    base = (base or Path.cwd()).resolve()
    path = Path(given)
    absolute = path if path.is_absolute() else Path.cwd() / path
    absolute = Path(os.path.normpath(absolute))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()


def located_fingerprint(model: str, finding: Finding) -> str:
    """Identity of one finding in one model file: the finding's own fingerprint (rule, layer,
    parameters; not numbers or wording) joined with the model's relative path, so it is the
    same on every machine and every run."""
    return hashlib.sha256(f"{model}\x1f{finding.fingerprint}".encode()).hexdigest()[:32]


def fingerprinted(report: Report, model: str) -> Iterator[tuple[Finding, str]]:
    """Each finding with a fingerprint unique within the report: a second finding with the
    same rule/layer/parameters gets `:2` appended (GitLab rejects duplicate fingerprints)."""
    seen: Counter[str] = Counter()
    for finding in report.findings:
        base = located_fingerprint(model, finding)
        seen[base] += 1
        yield finding, base if seen[base] == 1 else f"{base}:{seen[base]}"


def at_or_above(severity: Severity, fail_on: str) -> bool:
    if fail_on == "never":
        return False
    return severity.rank >= Severity(fail_on).rank


def fix_sentence(fix: Fix | None) -> str:
    """The fix in one line: scheme with its numbers, then code, then advice."""
    if fix is None:
        return ""
    parts = []
    if fix.init:
        numbers = [f"{name}={value:.4g}" for name, value in
                   (("gain", fix.gain), ("std", fix.std), ("bound", fix.bound))
                   if value is not None]
        numbers += [f"{name}={value}" for name, value in
                    (("fan_in", fix.fan_in), ("fan_out", fix.fan_out)) if value is not None]
        parts.append(f"{fix.init}({', '.join(numbers)})" if numbers else fix.init)
    if fix.bias:
        parts.append("bias -> zeros")
    if fix.code:
        parts.append(fix.code)
    if fix.advice:
        parts.append(fix.advice)
    return "; ".join(parts)


def finding_text(finding: Finding) -> str:
    """Message plus fix, for formats that carry one free-text field."""
    fix = fix_sentence(finding.fix)
    return f"{finding.message.rstrip('.')}. Fix: {fix}" if fix else finding.message


def json_safe(value: Any) -> Any:
    """Replace NaN/Inf (measured evidence can hold them) with strings: bare NaN is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def unlinted_fingerprint(item: Unlinted) -> str:
    return hashlib.sha256(f"{relative_path(item.path)}\x1f{'failed' if item.failed else 'skipped'}"
                          .encode()).hexdigest()[:32]
