"""What every rule is: a name, a default severity, its documentation, and a check.

A rule's docstring is its documentation, in four labelled parts — the summary line, then
`Why it matters:`, `Example:`, `Fix:` and `Thresholds:` paragraphs. The same text feeds
`gradprobe rule NAME`, ListRules over gRPC, and SARIF's rule metadata.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from gradprobe.diagnostics.report import EvidenceValue, Finding, Fix, Severity

if TYPE_CHECKING:
    from gradprobe.diagnostics.probe import LayerProbe, ProbeResult

_SECTIONS = ("Why it matters", "Example", "Fix", "Thresholds")


@dataclass(frozen=True)
class RuleDoc:
    name: str
    severity: Severity
    summary: str
    why: str
    example: str
    fix: str
    thresholds: str
    defaults: dict[str, float] = field(default_factory=dict)

    def full_text(self) -> str:
        parts = [f"{self.name} ({self.severity.value})", "", self.summary]
        for title, text in (("Why it matters", self.why), ("Example", self.example),
                            ("Fix", self.fix), ("Thresholds", self.thresholds)):
            if text:
                parts += ["", f"{title}:", textwrap.fill(text, 92, initial_indent="  ",
                                                        subsequent_indent="  ")]
        return "\n".join(parts)


def parse_doc(name: str, severity: Severity, docstring: str, defaults: dict[str, float]) -> RuleDoc:
    text = inspect.cleandoc(docstring or "")
    summary, _, rest = text.partition("\n\n")
    found = dict.fromkeys(_SECTIONS, "")
    pattern = re.compile(r"^(%s):\s*" % "|".join(_SECTIONS), re.M)
    marks = list(pattern.finditer(rest))
    for mark, nxt in zip(marks, marks[1:] + [None]):
        body = rest[mark.end(): nxt.start() if nxt else len(rest)]
        found[mark.group(1)] = " ".join(body.split())  # one paragraph per section
    return RuleDoc(name, severity, " ".join(summary.split()), found["Why it matters"],
                   found["Example"], found["Fix"], found["Thresholds"], dict(defaults))


class Rule:
    """Base class. Subclasses set `name`, `severity`, `defaults` and implement `check`."""

    name: ClassVar[str]
    severity: ClassVar[Severity]
    # Tunable numbers, overridable per rule from configuration.
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, thresholds: Mapping[str, float] | None = None,
                 severity: Severity | None = None) -> None:
        unknown = set(thresholds or {}) - set(self.defaults)
        if unknown:
            from gradprobe.diagnostics.errors import ConfigError

            raise ConfigError(
                f"rule {self.name} has no threshold {sorted(unknown)[0]!r}; "
                f"it knows: {', '.join(sorted(self.defaults)) or 'none'}"
            )
        self.t: dict[str, float] = {**self.defaults, **(thresholds or {})}
        self.configured_severity = severity

    @classmethod
    def doc(cls) -> RuleDoc:
        return parse_doc(cls.name, cls.severity, cls.__doc__ or "", cls.defaults)

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        raise NotImplementedError

    def finding(
        self,
        layer: LayerProbe | str,
        message: str,
        *,
        evidence: Mapping[str, EvidenceValue] | None = None,
        fix: Fix | None = None,
        severity: Severity | None = None,
        nodes: list[str] | None = None,
        parameters: list[str] | None = None,
    ) -> Finding:
        """Build a finding; a severity from configuration overrides the rule's choice, except
        that `info` (a deliberate pattern) is never promoted."""
        chosen = severity or self.severity
        if self.configured_severity is not None and chosen is not Severity.INFO:
            chosen = self.configured_severity
        if isinstance(layer, str):
            name, default_nodes, default_params = layer, [], []
        else:
            name = layer.point.layer
            default_nodes = [layer.point.node]
            default_params = list(layer.point.parameters)
        return Finding(
            rule=self.name,
            severity=chosen,
            layer=name,
            nodes=nodes if nodes is not None else default_nodes,
            parameters=parameters if parameters is not None else default_params,
            message=message,
            evidence=dict(evidence or {}),
            fix=fix,
        )
