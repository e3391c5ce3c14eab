"""The rule set. One rule per module; this file only lists them, in report order."""

from __future__ import annotations

from gradprobe.diagnostics.rules.base import Rule, RuleDoc
from gradprobe.diagnostics.rules.constant_weights import ConstantWeights
from gradprobe.diagnostics.rules.dead_gradients import DeadGradients
from gradprobe.diagnostics.rules.dead_relu import DeadRelu
from gradprobe.diagnostics.rules.exploding_activations import ExplodingActivations
from gradprobe.diagnostics.rules.exploding_gradients import ExplodingGradients
from gradprobe.diagnostics.rules.init_scale import InitScale
from gradprobe.diagnostics.rules.nonfinite_values import NonfiniteValues
from gradprobe.diagnostics.rules.nonfinite_weights import NonfiniteWeights
from gradprobe.diagnostics.rules.saturated_activation import SaturatedActivation
from gradprobe.diagnostics.rules.vanishing_activations import VanishingActivations
from gradprobe.diagnostics.rules.vanishing_gradients import VanishingGradients
from gradprobe.diagnostics.rules.zero_weights import ZeroWeights

_RULES: list[type[Rule]] = [
    NonfiniteWeights, NonfiniteValues, ZeroWeights, ConstantWeights, InitScale,
    VanishingActivations, ExplodingActivations, DeadRelu, SaturatedActivation,
    VanishingGradients, ExplodingGradients, DeadGradients,
]


def all_rules() -> list[type[Rule]]:
    return list(_RULES)


def rule_named(name: str) -> type[Rule]:
    from gradprobe.diagnostics.errors import ConfigError

    for rule in _RULES:
        if rule.name == name:
            return rule
    known = ", ".join(r.name for r in _RULES)
    raise ConfigError(f"unknown rule {name!r}; known rules: {known}")


__all__ = ["Rule", "RuleDoc", "all_rules", "rule_named"]
