"""`gradprobe fix`: write a copy of a model whose flagged weights are re-initialised, and probe
it again.

Two methods:
- "auto": each error/warning finding names a scheme (He/Xavier/LeCun with its numbers); the
  tensors that finding is about get exactly that scheme, seeded by the probe seed. Whole-model
  trends (vanishing/exploding activations and gradients) re-initialise every layer of the trend
  with the scheme for its own nonlinearity — when the finding names a scheme at all: where the
  rule judges the remedy architectural (a sigmoid stack) no init is tried.
- "lsuv": data-driven layer-sequential unit-variance init over every linear/conv layer
  (see `lsuv.py`), on the same probe batch `diagnose` uses.

A repair can uncover the next problem (a head that was hidden behind saturated layers shows its
own oversized init once they pass signal again), so "auto" probes the written copy and repairs
what newly shows up, for at most MAX_ROUNDS rounds; a tensor is re-initialised at most once.

Never touched: tensors of info findings (deliberate zeros: zero heads, zero-init residual
branches), norm-layer scales and shifts, embedding tables. Findings that no init can cure
(NaN made by an operation, parameters cut off from the output) are reported as such.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gradprobe.diagnostics.api import diagnose, pick_device
from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.graph import LoadedModel, ProbePoint
from gradprobe.diagnostics.init_schemes import recommended_init, unit_scale, user_expr
from gradprobe.diagnostics.init_values import draw, generator_for
from gradprobe.diagnostics.inputs import file_inputs, synthetic_inputs
from gradprobe.diagnostics.loaders import load_model
from gradprobe.diagnostics.lsuv import LsuvLayer, lsuv_init
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Finding, Fix, Report, Severity

Method = Literal["auto", "lsuv"]

# Findings about one weight tensor: re-initialise that tensor with the finding's fix.
WEIGHT_RULES = frozenset({"zero-weights", "constant-weights", "nonfinite-weights", "init-scale"})
# Findings about an activation: re-initialise the layer that produces it.
PRODUCER_RULES = frozenset({"dead-relu", "saturated-activation"})
# Whole-model trends: every layer of the trend, each with the scheme for its nonlinearity.
TREND_RULES = frozenset({"vanishing-activations", "exploding-activations",
                         "vanishing-gradients", "exploding-gradients"})
INIT_RULES = WEIGHT_RULES | PRODUCER_RULES | TREND_RULES
MAX_ROUNDS = 3


@dataclass
class ChangedTensor:
    name: str
    layer: str
    scheme: str  # an init scheme, 'zeros', 'ones', or 'lsuv' (orthogonal rescaled to unit output variance)
    std: float | None = None
    bound: float | None = None
    gain: float | None = None  # lsuv: the factor applied to the orthogonal start
    reasons: list[str] = field(default_factory=list)  # rule names (or 'lsuv') behind the change
    round: int = 1  # auto: the round that changed it (later rounds fix what earlier ones uncovered)
    expr: str = ""  # how the user's code names it: `model.layer1[0].conv1.weight`


@dataclass
class RepairOutcome:
    method: Method
    source: Path
    output: Path
    format: str
    before: Report
    after: Report
    changed: list[ChangedTensor]
    not_fixable: list[Finding]  # error/warning findings no re-initialisation addresses
    left_alone: list[str]  # tensors deliberately not touched, with why
    lsuv: list[LsuvLayer] = field(default_factory=list)


def repair(model_path: Path, output: Path, options: DiagnoseOptions,
           method: Method = "auto") -> RepairOutcome:
    """Diagnose `model_path`, write the repaired copy to `output` (same format), diagnose it."""
    model_path, output = Path(model_path), Path(output)
    _check_output(model_path, output)
    if method not in ("auto", "lsuv"):
        raise ConfigError(f"unknown fix method {method!r}: use auto or lsuv")
    before = diagnose(model_path, options)
    model = load_model(model_path, options.format)
    model.to(pick_device(options.device))
    plan = _Plan(model)
    plan.protect(before)

    lsuv_layers: list[LsuvLayer] = []
    values: dict[str, torch.Tensor] = {}
    if method == "lsuv":
        lsuv_layers = _apply_lsuv(model, options, plan, before)
        values = {c.name: model.parameters[c.name].detach() for c in plan.changed.values()}
        _save(model, output, values)
        after = diagnose(output, options)
    else:
        after = before
        for round_ in range(1, MAX_ROUNDS + 1):
            plan.protect(after)
            new = plan.from_findings(after, round_)
            if not new and round_ > 1:
                break
            values.update(plan.values(new, options.seed))
            _save(model, output, values)
            after = diagnose(output, options)
    return RepairOutcome(method, model_path, output, model.format, before, after,
                         list(plan.changed.values()), plan.not_fixable, plan.left_alone,
                         lsuv_layers)


def _save(model: LoadedModel, output: Path, values: dict[str, torch.Tensor]) -> None:
    try:
        model.save(output, values)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None


def _check_output(source: Path, output: Path) -> None:
    if output.resolve() == source.resolve() or (
            output.exists() and source.exists() and os.path.samefile(output, source)):
        raise ConfigError(f"fix: the output {output} is the model itself; write the fixed copy "
                          f"to another file (-o FIXED)")
    if not source.is_file():
        return  # the loader says what is wrong with the model, before anything about the output
    if output.is_dir():
        raise ConfigError(f"fix: the output {output} is a directory; name a file")
    if not output.parent.is_dir():
        raise ConfigError(f"fix: cannot write {output}: folder {output.parent} does not exist")


class _Plan:
    """Which tensors change, to what, and which findings are left to the user."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.changed: dict[str, ChangedTensor] = {}
        self.not_fixable: list[Finding] = []
        self.left_alone: list[str] = []
        self.protected: dict[str, str] = {}  # tensor -> why it is never touched
        self._round = 1
        self._owner: dict[str, ProbePoint] = {}  # weight or bias name -> its layer
        for point in model.probe_points:
            for name in (point.weight, point.bias):
                if name:
                    self._owner.setdefault(name, point)
        for point in model.probe_points:
            if point.role == "norm":
                for name in point.parameters:
                    self.protected.setdefault(name, "norm-layer scale/shift")
            elif point.is_embedding and point.weight:
                self.protected.setdefault(point.weight, "embedding table")

    def protect(self, report: Report) -> None:
        """Tensors of info findings about one weight are deliberate (zero head, zero-init
        residual, a constant start that trains): keep them. An info *trend* (activation variance
        drifting over 50 layers, judged harmless) marks no tensor as deliberate: protecting its
        layers would block the fix another finding asks for there (a dead ReLU's producer)."""
        for f in report.findings:
            if f.severity is not Severity.INFO or f.rule not in WEIGHT_RULES:
                continue
            for name in f.parameters:
                if name not in self.protected and name in self.model.parameters:
                    self.protected[name] = f"deliberate ({f.rule}, info)"
                    self.left_alone.append(f"{name}: {self.protected[name]}")

    # -- auto: driven by the findings ------------------------------------------------------

    def from_findings(self, report: Report, round_: int) -> list[str]:
        """Plan the tensors this report's error/warning findings ask for; returns the names
        newly planned."""
        before = set(self.changed)
        self._round = round_
        known = {f.fingerprint for f in self.not_fixable}
        serious = [f for f in report.findings if f.severity is not Severity.INFO]
        # Weight-level findings first: their exact fix wins over a trend's generic scheme.
        for finding in sorted(serious, key=lambda f: f.rule in TREND_RULES):
            if finding.rule in WEIGHT_RULES:
                handled = self._weight_finding(finding)
            elif finding.rule in PRODUCER_RULES:
                handled = self._producer_finding(finding)
            elif finding.rule in TREND_RULES:
                handled = self._trend_finding(finding)
            else:
                handled = False
            if not handled and finding.fingerprint not in known:
                self.not_fixable.append(finding)
                known.add(finding.fingerprint)
        return [name for name in self.changed if name not in before]

    def _weight_finding(self, finding: Finding) -> bool:
        handled = False
        if finding.rule == "zero-weights" and "sample_var" in finding.evidence \
                and (finding.fix is None or finding.fix.init is None):
            # The zero scale or gate where the output stopped depending on the input: named as
            # the cause, so the protection of norm layers gives way.
            for name in finding.parameters:
                handled |= self._set_ones(name, finding.layer or name, finding.rule)
            return handled
        for name in finding.parameters:
            point = self._owner.get(name)
            if point is not None and name == point.bias:
                handled |= self._set(name, point, Fix(), finding.rule, zeros=True)
            elif point is not None:
                handled |= self._set(name, point, finding.fix, finding.rule)
        return handled

    def _producer_finding(self, finding: Finding) -> bool:
        handled = False
        reset_bias = finding.fix is not None and finding.fix.bias == "zeros"
        for name in finding.parameters:
            point = self._owner.get(name)
            if point is not None and point.role == "norm" and name == point.bias and reset_bias \
                    and finding.rule == "dead-relu":
                # The finding names this BatchNorm shift as what silences the ReLU: not a
                # deliberate norm parameter, so the protection of norm layers gives way.
                handled |= self._set(name, point, Fix(), finding.rule, zeros=True,
                                     named_cause=True)
                continue
            if point is None or point.role != "linear":
                continue
            if name == point.weight:
                handled |= self._set(name, point, finding.fix, finding.rule)
            elif name == point.bias and reset_bias:
                handled |= self._set(name, point, Fix(), finding.rule, zeros=True)
        return handled

    def _trend_finding(self, finding: Finding) -> bool:
        if finding.fix is None or finding.fix.init is None:
            return False  # the rule judged the remedy architectural (e.g. a sigmoid stack)
        handled = False
        for name in finding.parameters:
            point = self._owner.get(name)
            if point is not None and name == point.weight and point.role == "linear":
                # The trend's fix names one scheme for the model; each layer gets its own.
                handled |= self._set(name, point, recommended_init(point), finding.rule)
        return handled

    def _set(self, name: str, point: ProbePoint, fix: Fix | None, rule: str,
             zeros: bool = False, named_cause: bool = False) -> bool:
        guard = self.protected.get(name)
        if named_cause and guard == "norm-layer scale/shift":
            guard = None
        if guard is not None or name not in self.model.parameters:
            note = f"{name}: {self.protected.get(name, 'not a parameter of the model')}"
            if note not in self.left_alone:
                self.left_alone.append(note)
            return False
        if name in self.changed:  # at most once: a second draw would only chase noise
            if rule not in self.changed[name].reasons:
                self.changed[name].reasons.append(rule)
            return True
        if zeros:
            self.changed[name] = ChangedTensor(name, point.layer, "zeros", reasons=[rule],
                                               round=self._round, expr=user_expr(point, name))
            return True
        if fix is None or fix.init is None or (fix.std is None and fix.bound is None):
            fix = recommended_init(point)
        if fix.init is None:
            return False
        std = fix.std if fix.std is not None else (fix.bound / math.sqrt(3) if fix.bound else None)
        bound = fix.bound if fix.bound is not None else (std * math.sqrt(3) if std else None)
        self.changed[name] = ChangedTensor(name, point.layer, fix.init, std, bound, fix.gain,
                                           [rule], self._round, expr=user_expr(point, name))
        return True

    def _set_ones(self, name: str, layer: str, rule: str) -> bool:
        if name not in self.model.parameters or self.protected.get(name, "").startswith("deliberate"):
            return False
        if name not in self.changed:
            owner = self._owner.get(name)
            self.changed[name] = ChangedTensor(name, layer, "ones", reasons=[rule],
                                               round=self._round,
                                               gain=unit_scale(owner) if owner else None)
        return True

    def values(self, names: list[str], seed: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            change = self.changed[name]
            param = self.model.parameters[name]
            value = draw(change.scheme, param.shape, std=change.std, bound=change.bound,
                         gain=change.gain or 1.0,
                         layout=owner.weight_layout if (owner := self._owner.get(name)) else "out_in",
                         gen=generator_for(seed, name))
            out[name] = value.to(device=param.device, dtype=param.dtype)
        return out

    # -- lsuv: every linear/conv layer ------------------------------------------------------

    def record_lsuv(self, layers: list[LsuvLayer], report: Report) -> None:
        points = {p.weight: p for p in self.model.probe_points if p.weight}
        for item in layers:
            point = points.get(item.weight)
            self.changed[item.weight] = ChangedTensor(
                item.weight, item.layer, "lsuv", gain=item.scale, reasons=["lsuv"],
                expr=user_expr(point, item.weight) if point else "")
            if item.bias and item.bias not in self.protected and item.bias in self.model.parameters:
                self.changed[item.bias] = ChangedTensor(
                    item.bias, item.layer, "zeros", reasons=["lsuv"],
                    expr=user_expr(point, item.bias) if point else "")
        kinds: dict[str, int] = {}
        for name, why in self.protected.items():
            if not why.startswith("deliberate") and name in self.model.parameters:
                kinds[why] = kinds.get(why, 0) + 1
        self.left_alone += [f"{count} tensor(s): {why}" for why, count in kinds.items()]
        # LSUV re-initialises every layer: a finding is not fixable when no init addresses it.
        self.not_fixable = [f for f in report.findings
                            if f.severity is not Severity.INFO and f.rule not in INIT_RULES]


def _apply_lsuv(model: LoadedModel, options: DiagnoseOptions, plan: _Plan,
                report: Report, inputs: list[torch.Tensor] | None = None) -> list[LsuvLayer]:
    """LSUV on `inputs` (a live model's batch), else on the batch `diagnose` draws."""
    device = model.device
    if inputs is not None:
        pass
    elif options.input_file:
        inputs, _ = file_inputs(model.inputs, Path(options.input_file), device)
    else:
        inputs, _ = synthetic_inputs(model.inputs, options, device)
    layers = lsuv_init(model, inputs, seed=options.seed, protected=set(plan.protected))
    plan.record_lsuv(layers, report)
    # The resulting weight scale, read once for the report.
    stds = [model.parameters[c.weight].detach().float().std(correction=0) for c in layers]
    if stds:
        for item, std in zip(layers, torch.stack(stds).cpu().tolist(), strict=True):
            plan.changed[item.weight].std = std
    return layers
