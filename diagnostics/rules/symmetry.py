"""Judging a zero or constant weight by its gradient.

Units that start equal and receive equal updates stay equal forever. So a zero or constant
weight cannot train when its gradient is zero or identical across its output units, and is a
deliberate start (zero head, LoRA B, ControlNet zero conv, zero-init residual) when every unit
receives its own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradprobe.diagnostics.probe import ParamProbe

# Relative spread of the per-unit gradients below which units count as receiving the same update.
IDENTICAL_SPREAD = 1e-6


@dataclass(frozen=True)
class SymmetryVerdict:
    can_train: bool
    reason: str


def judge(param: ParamProbe) -> SymmetryVerdict:
    s = param.stats
    if param.unused:
        return SymmetryVerdict(False, "no gradient reaches it at all")
    if s.grad_norm == 0:
        return SymmetryVerdict(False, "its gradient is exactly zero, so it can never move")
    if param.unit_spread is not None and param.unit_spread <= IDENTICAL_SPREAD:
        return SymmetryVerdict(False, "every output unit receives the same gradient, so the units "
                                      "stay identical (symmetry never breaks)")
    if param.judged_at_step > 1:
        return SymmetryVerdict(True, "each output unit receives its own gradient once the "
                                     "zero-initialised tensors after it have moved, so it trains "
                                     "from the second step")
    return SymmetryVerdict(True, "each output unit receives its own gradient, so it trains from "
                                 "the first step")
