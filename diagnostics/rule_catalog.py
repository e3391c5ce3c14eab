"""The rules' documentation without the rules: what `gradprobe rules` / `gradprobe rule NAME`
print, read from generated data so these commands never import torch. The data is written
from the rule modules by scripts/gen_rule_catalog.py and checked fresh by a test."""

from __future__ import annotations

from gradprobe.diagnostics._rule_catalog_data import CATALOG
from gradprobe.diagnostics.errors import ConfigError


def rule_rows() -> list[tuple[str, str, str]]:
    """(name, verdicts such as 'warning/error', summary) per rule, in report order."""
    return [(e["name"], "/".join(e["verdicts"]), e["summary"]) for e in CATALOG]


def rule_text(name: str) -> str:
    for entry in CATALOG:
        if entry["name"] == name:
            verdicts = "/".join(entry["verdicts"])
            head, _, rest = entry["text"].partition("\n")
            if verdicts != entry["severity"]:  # say every verdict the rule can give
                head = f"{entry['name']} ({entry['severity']} by default; reports {verdicts})"
            return f"{head}\n{rest}"
    known = ", ".join(e["name"] for e in CATALOG)
    raise ConfigError(f"unknown rule {name!r}; known rules: {known}")
