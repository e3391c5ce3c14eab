from __future__ import annotations

from collections.abc import Iterator

from gradprobe.diagnostics.graph import ProbePoint
from gradprobe.diagnostics.init_schemes import param_expr, recommended_init
from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.symmetry import judge


class ZeroWeights(Rule):
    """A layer's weight tensor is all zeros.

    Why it matters: units with identical (zero) weights compute the same value and, if they also
    receive the same gradient, get the same update at every step: the layer never learns more
    than one feature. A zero weight that blocks the gradient (e.g. the first conv of a residual
    branch, in front of a ReLU) never moves at all. A zero that leaves no path around it — a
    zeroed LayerNorm scale under the embeddings, a gate stuck at 0 in a block without a skip —
    makes the network's output the same for every input. Deliberate zeros keep a path: a zero
    classification head, LoRA's B, ControlNet zero convs and zero-init residual scales receive a
    distinct gradient per unit, the input still reaches the output around them, and they are
    reported as info.
    Example: `nn.init.zeros_(model.net[0].weight)` on a hidden layer of an MLP;
    `model.embeddings.LayerNorm.weight.data.zero_()` in BERT.
    Fix: initialise the weight with the scheme that matches the nonlinearity that follows (He for
    the ReLU family, Xavier for tanh/sigmoid/linear, LeCun for SELU; ones for a norm scale or a
    multiplicative gate); the finding carries the std, bound and the PyTorch line.
    Thresholds: every entry exactly 0. Error when the gradient is zero or identical across output
    units (relative spread <= 1e-6; a zero whose gradient only another zero after it blocks,
    a zero-init branch end inside a block whose last BatchNorm scale is zero as in timm's
    GlobalContext ResNets, is judged at the second step, once the zeros that get a gradient at
    the first have moved), when every value between it and the next layer is the same for
    every sample and the next layer's output is the same for every sample too, or one of them is
    exactly zero and a later layer before the next norm is fed nothing (a zeroed first layer of a
    branch: the next layer is fed nothing, unlike a zeroed last layer, whose residual add still
    varies, even folded into its conv with nothing after the add or followed by a squeeze-excite
    whose pooled projections alone see the zero, or a zero-initialised MoE router, whose uniform
    scores, sigmoid(0) = 0.5, still weigh the experts; with nothing probed in between, as for a
    zeroed factor of a product like LLaMA's `up_proj`, when the next layer's output is the same for
    every sample behind a non-zero weight), or when the output no longer varies across the probe
    batch from this point on (the zero is where the across-batch variance first collapses, before
    the last layer, or the module that holds a zero no layer owns, such as a GroupNorm scale a
    legacy ONNX export multiplies in after InstanceNormalization); info otherwise. Biases are never
    reported: zero is their standard init. Where an eval-mode export folded a BatchNorm into the
    layer, the finding says the zero may be that BatchNorm's scale rather than the layer's weight
    (the file cannot tell them apart), naming the BatchNorm where the file keeps its name (dynamo
    exports; legacy ones keep none).
    """

    name = "zero-weights"
    severity = Severity.ERROR

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        cut = probe.signal_cut()
        cut_named = False
        for lp in probe.layers:
            point = lp.point
            if point.role not in ("linear", "norm") or not point.weight:
                continue
            param = probe.params[point.weight]
            if param.stats.abs_max != 0 or param.stats.nonfinite:
                continue
            verdict = judge(param)
            evidence = {"grad_norm": param.stats.grad_norm, "shape": param.stats.shape}
            if param.unit_spread is not None:
                evidence["unit_grad_spread"] = param.unit_spread
            cut_here = cut is not None and _cut_by(probe, point, cut)
            cut_named |= cut_here
            if cut_here and (verdict.can_train or point.role == "norm"):
                yield self._cut_finding(lp, [point.weight], evidence)
                continue
            if verdict.can_train and point.role == "linear" and probe.starves_next_layer(lp):
                fix = recommended_init(point)
                yield self.finding(
                    lp, f"{point.layer}.weight is all zeros and the layer after it is fed nothing "
                        f"(what reaches the next layer is the same for every sample): the "
                        f"path through {point.layer} carries no signal and the layers behind it get "
                        f"no gradient at step 0. Initialise it with {fix.init} (std {fix.std:.3g}); "
                        f"to start a residual branch at zero, zero its last layer instead."
                        + _folded_note(point),
                    evidence={**evidence, "starves_next_layer": True, **_folded_evidence(point)},
                    fix=fix,
                    parameters=[point.weight])
                continue
            if verdict.can_train or point.role == "norm":
                what = "a zero scale" if point.role == "norm" else "a zero weight"
                yield self.finding(
                    lp, f"{point.layer} starts with {what} ({point.weight}); {verdict.reason} — "
                        f"a deliberate zero start (zero head, zero-init residual, LoRA B).",
                    evidence=evidence, severity=Severity.INFO, parameters=[point.weight])
                continue
            fix = recommended_init(point)
            yield self.finding(
                lp, f"{point.layer}.weight is all zeros and {verdict.reason}: this layer cannot "
                    f"learn. Initialise it with {fix.init} (std {fix.std:.3g})."
                    + _folded_note(point),
                evidence={**evidence, **_folded_evidence(point)}, fix=fix,
                parameters=[point.weight])
        if cut_named or (cut is None and probe.output_varies):
            return
        heads = [lp for lp in probe.of_role("linear") if lp.point.weight]
        if cut is None and heads and probe.params[heads[-1].point.weight].stats.abs_max == 0:
            return  # a zero head makes every output the same at step 0, deliberately
        # The zero sits between probe points (a gate or scale multiplied in) or after the last
        # one (a final RMSNorm's scale): name the all-zero tensors no layer owns as suspects.
        suspects = probe.zero_tensors_outside_layers()
        if cut is not None:
            # A zero read only after the cut did not make it (the dynamo exporter stores zero
            # constants for an attention's masks, read in every block).
            before = [n for n in suspects if _first_point(probe, probe.params[n].layer)
                      <= cut.point.index]
            suspects = before or suspects
        if suspects:
            owners = {probe.params[name].layer for name in suspects}
            # One module holds every zero: it is where the defect is, the cut only where it
            # shows (a legacy ONNX export splits GroupNorm into InstanceNormalization and a Mul
            # by its weight, so a zeroed scale is no layer's weight; the activation after it is
            # where the variance collapses). A root attribute's layer is its own name: no
            # module to name, so the cut is where.
            where: LayerProbe | str
            if cut is None:
                where = suspects[0].rsplit(".", 1)[0]
            elif len(owners) == 1 and not owners & {"", *suspects}:
                where = next(iter(owners))
            else:
                where = cut
            yield self._cut_finding(where, suspects, {"suspects": len(suspects)})

    def _cut_finding(self, lp: LayerProbe | str, zeros: list[str],
                     evidence: dict[str, object]) -> Finding:
        names = ", ".join(zeros[:3]) + (" ..." if len(zeros) > 3 else "")
        layer = lp if isinstance(lp, str) else lp.point.layer
        if not isinstance(lp, str) and lp.point.role == "linear" and zeros == [lp.point.weight]:
            fix = recommended_init(lp.point)
        else:
            fix = Fix(code="\n".join(f"nn.init.ones_({param_expr(n, n.rsplit('.', 1)[0])})"
                                     for n in zeros[:3]),
                      advice="initialise the zero scale/gate to ones, or add a residual path "
                             "around it")
        how = f" with {fix.init}" if fix.init else " (ones for a norm scale or a gate)"
        return self.finding(
            lp, f"the network's output no longer depends on its input from {layer} on: "
                f"every sample gives the same value there and nothing after it varies again, "
                f"because {names} {'is' if len(zeros) == 1 else 'are'} all zeros with no path "
                f"around. Initialise it non-zero{how}."
                + ("" if isinstance(lp, str) else _folded_note(lp.point)),
            evidence={**evidence, "sample_var": 0.0,
                      **({} if isinstance(lp, str) else _folded_evidence(lp.point))},
            fix=fix, parameters=list(zeros))



def _cut_by(probe: ProbeResult, point: ProbePoint, cut: LayerProbe) -> bool:
    """The cut is at this zero's point, or, for a norm over a weight (weight standardisation),
    at the layer whose weight it computes: the next parameterised layer."""
    if cut.point.index == point.index:
        return True
    if not point.on_weights:
        return False
    reader = next((lp for lp in probe.of_role("linear") if lp.point.index > point.index), None)
    return reader is cut


def _first_point(probe: ProbeResult, layer: str) -> int:
    """Index of the first probe point in `layer` (or inside it); -1 when none is: position
    unknown, so the caller keeps it."""
    return next((lp.point.index for lp in probe.layers if lp.point.layer == layer
                 or lp.point.layer.startswith((layer + ".", layer + ":", layer + "#"))), -1)


def _folded_note(point: ProbePoint) -> str:
    """An eval-mode export folds a BatchNorm into the conv before it (W * gamma / sqrt(var +
    eps)): a zero folded weight is a zero conv weight or a zero BatchNorm scale in the user's
    model, which the file cannot tell apart. Say both, so the fix goes where the zero is; name
    the BatchNorm where the file keeps its name (dynamo)."""
    if not point.folded_batchnorm:
        return ""
    norm = point.folded_norm
    if norm:
        return (f" In this file the BatchNorm {norm} is folded into {point.layer} (an eval-mode "
                f"export): in your model the zero may be {norm}.weight (initialise it with "
                f"ones: nn.init.ones_({param_expr(norm + '.weight', norm)})) rather than "
                f"{point.layer}'s weight.")
    return (f" In this file a BatchNorm is folded into {point.layer} (an eval-mode export): in "
            f"your model the zero may be that BatchNorm's scale (its weight; initialise it with "
            f"ones) rather than {point.layer}'s weight.")


def _folded_evidence(point: ProbePoint) -> dict[str, object]:
    if not point.folded_batchnorm:
        return {}
    return {"folded_batchnorm": True, **({"folded_norm": point.folded_norm}
                                         if point.folded_norm else {})}
