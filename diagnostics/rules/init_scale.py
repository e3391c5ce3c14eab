from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import recommended_init, target_variance, user_expr
from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.depth_trend import layer_kind

# Fewer inputs per unit than this and |g|/|w| behind BatchNorm is noise.
MIN_FAN_IN_BEHIND_BN = 16
# A gradient that reaches fewer of the layer's output entries than this sums over too few
# positions for |g|/|w| to compare with layers that every position feeds back into.
MIN_GRADIENT_REACH = 0.05


class InitScale(Rule):
    """A weight's scale is far from what its fan-in and nonlinearity need, and the measured
    signal shows it.

    Why it matters: without normalisation behind it, a layer whose weight variance is k times the
    scheme's multiplies the activation variance by ~k and passes the distortion to every layer
    after it. Behind BatchNorm the forward pass is unchanged, but the weight's scale sets its
    effective learning rate (~1/|w|^2): a layer initialised 10x He (in variance) sees a relative
    update |g|/|w| ~10x smaller than its neighbours and trains that much slower.
    The scheme is only the yardstick for the fix, never the verdict: BERT/GPT-2/ViT start their
    linears at std 0.02 (far below Xavier for wide layers) and train well because LayerNorm and
    residual paths keep the signal in range; nothing fires there because the signal is fine.
    Behind a LayerNorm (pre-LN transformers, MLP-Mixers) a block initialised far above the
    others restores nothing: its branch output drowns the residual stream it is added to, and its
    weights barely move (a pre-LN stack with one block at 10x He std: the block moves ~20x less
    than in its twin under AdamW, ~200x less under SGD, and the network ends worse;
    tests/test_training_ln_scale.py).
    Example: `nn.init.normal_(model.net[2].weight, std=1.0)` in a 256-wide ReLU MLP (He std 0.088).
    Fix: re-initialise with the scheme for the following nonlinearity (He/Xavier/LeCun); the
    finding carries the std, bound and the PyTorch line. A layer judged against its peers gets
    normal(0, the median std of its peers): the library's own init for that layer.
    Thresholds: weight variance at least `weight_factor` (10) times above the scheme's, or
    `shrink_factor` (100) times below it (a uniform shrink in a ReLU network rescales everything
    after it by one constant factor: torchvision's fan-out init of VGG's 3-channel stem, 0.05x He,
    starts with small logits and trains);
    without a norm behind it, the layer's output variance must also be at least `flow_factor` (5)
    times off the second moment of its input (a He layer after a ReLU gives ~2), in the same
    direction, and the distortion must reach what the following layers are fed: for a blow-up,
    every later layer's input (or, for the last layer, the output); for a shrink, no later layer's
    input, no later normalisation's output and not the network's output may recover (a LayerNorm
    or residual path that restores the scale keeps the rule silent, and so does a final norm the
    probe does not see: the last block of a pre-norm transformer; an output whose rows all share
    one RMS ends in a norm, which restores any scale: Dory's L2 normalisation); what a layer was
    fed is the last value probed before it unless its own output, Var(out) / (fan_in Var(W)),
    says it was fed `weight_factor` times more (CoaT's position conv reads the values, probed after the
    keys' softmax); what a later layer was fed is also read off its own output,
    Var(out) / (fan_in Var(W)), since graph order is not data flow: a hand-written
    RMSNorm is no probe point, and an MoE's expert projections follow its router in the graph),
    and the layers after the last normalisation (the head: small logits are a deliberate start)
    are not judged for a shrink. A too-large weight whose distortion a norm restores is still a
    defect when its weight variance and its output variance are both `weight_factor` times the
    median of its peers' (the same layer in the other blocks: the same weight name up to its
    numbers, the same shape). Measured on 130 healthy models of timm, torchvision and
    transformers at their default init, no layer is more than 7x its peers in variance (BEiT's
    1/sqrt(2 * layer_id) depth scaling, and there below the scheme); a block planted at 10x He
    std is 100x (He-initialised libraries) to 2600x (timm's ViT, std 0.02). A whole stage
    initialised apart is its own peer group, so the same layer in the other stages (any width,
    each relative to its scheme) is the second yardstick, at `stage_factor` (100) in weight and
    in output variance: convnext_atto's third stage at 10x He is 1.3e3x to 2e4x the other
    stages behind LayerScale at 1e-6 (its weights then move 28-106x less than the library's
    under AdamW), while across 132 healthy timm and torchvision models (one or two per family)
    no layer is above 57x (timm's BAT `ba.conv1`, fan-out init). Behind BatchNorm
    only a too-large weight is a defect: its variance must also be `weight_factor` times the
    median of its BatchNorm-backed peers' (relative to their schemes: a library that starts
    every layer above He, as timm's Inception does, made one choice), under He fan-in and under
    He fan-out alike (a library that starts its convs at fan-out puts a 1x1 conv with 64x more
    inputs than outputs 64x above He fan-in: timm's BAT attention), and its |g|/|w| at least
    `update_factor` (30) times below that of the BatchNorm-backed layers at the library's scale
    around it (the geometric mean of the medians of the nearest four before and after: at init
    |g|/|w| falls ~100x from the first stage to the last, so a whole stage is judged against the
    stages on either side; a stage at 10x He std trains ~100x slower and never catches up). A
    too-small weight there takes larger relative steps, its norm grows and the step
    shrinks back (BatchNorm's auto rate-tuning, Arora, Li & Lyu, ICLR 2019): fan-out stems and
    depthwise convs (torchvision, timm) train fine. Depthwise kernels (one input channel per
    unit) and layers with fewer than 16 inputs per unit are not compared behind BatchNorm (their
    |g|/|w| is noise), nor are layers behind a global pool (one position per sample: their
    gradient sums over the samples, a spatial layer's over every position), nor layers whose
    output the gradient reaches at fewer than 5% of its entries (max-pooled to a few cells:
    timm's BAT attention). In a network with
    normalisation, the head (the layers after the last norm) is judged for a blow-up only when
    the output variance reaches `head_output_var` (100: logits of std 10 saturate the softmax).
    Embedding tables (no fan-in) are not judged.
    """

    name = "init-scale"
    severity = Severity.WARNING
    defaults = {"weight_factor": 10.0, "shrink_factor": 100.0, "flow_factor": 5.0,
                "update_factor": 30.0, "head_output_var": 100.0, "stage_factor": 100.0}

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        has_norm = probe.has_normalisation
        judged = [lp for lp in probe.of_role("linear")
                  if lp.point.weight and lp.activation and not lp.point.is_embedding]
        if not judged:
            return
        backed = [lp for lp in judged
                  if lp.point.followed_by_norm and _compared_behind_bn(probe, lp)]
        library = _BackedScale(probe, backed)
        # The yardstick for a relative update: the layers at the library's scale (a planted
        # stage is not its own reference).
        in_scale = [lp for lp in backed if lp.point.index in library.known
                    and not library.far_above(lp.point.index, self.t["weight_factor"])]
        powers = _input_powers(probe)
        output_var = judged[-1].activation.var  # type: ignore[union-attr]
        # Normalisation outputs: what a residual stream is restored to (the power each norm
        # emits), and where the head begins (layers after the last norm make the logits).
        norm_powers = {lp.point.index: lp.activation.var + lp.activation.mean**2
                       for lp in probe.of_role("norm") if lp.activation is not None}
        head_from = max(norm_powers, default=None)
        peers = _same_role_peers(probe, judged)
        other_stages = _other_stage_peers(probe, judged)
        wf, ff, uf = self.t["weight_factor"], self.t["flow_factor"], self.t["update_factor"]
        for lp in judged:
            point = lp.point
            stats = probe.params[point.weight].stats  # type: ignore[index]
            target = target_variance(point)
            if target is None or stats.constant or stats.nonfinite:
                continue
            k = stats.std**2 / target
            if 1 / wf < k < wf:
                continue
            if point.followed_by_norm:
                if not library.far_above(point.index, wf) \
                        or not (reference := _update_reference(probe, in_scale, point.index)):
                    continue
                rel = stats.grad_to_weight / reference
                # Only the slow direction is a defect: a small weight behind BatchNorm takes
                # larger relative steps, its norm grows and the step shrinks back (Arora, Li &
                # Lyu, ICLR 2019); a large one takes tiny steps and stays slow.
                if k >= wf and rel <= 1 / uf:
                    yield self._finding(lp, k, evidence={"relative_update": rel}, how=(
                        f"behind BatchNorm its relative update |g|/|w| is {rel:.2g}x that of the "
                        f"layers around it at the library's scale: it trains "
                        f"~{max(rel, 1 / rel):.0f}x "
                        f"{'slower' if rel < 1 else 'faster'} than its neighbours"))
                continue
            power = powers[point.index]
            var_out = lp.activation.var  # type: ignore[union-attr]
            if not (power > 0 and math.isfinite(var_out)):
                continue
            fed = probe.fed_power(lp)
            if fed is not None and fed > wf * power:
                # The value probed before it is not what it reads (CoaT's shared position conv
                # reads the values v; the last probed value is the keys' softmax, ~1e3x smaller):
                # judge the layer by what its own output says it was fed. Only upwards: that
                # estimate takes the weight's own gain for granted, so it can only clear a layer
                # the graph order accused (a squeeze-excite projection reads the pooled value,
                # smaller than the one probed before it, and stays judged as before).
                power = fed
            jump = var_out / power
            # What the layers after it are fed, relative to what this layer was fed: a
            # distortion that LayerNorm or a residual path undoes never reaches them.
            later = [powers[x.point.index] / power for x in judged if x.point.index > point.index]
            if k >= wf and jump >= ff:
                carried = min(later) if later else output_var / power
                # A normalised network's head sets the logits' scale: only logits large enough
                # to saturate the softmax (std >= 10) are a defect there (timm's and
                # torchvision's Inception start their fc at std 0.1: logits of std ~3).
                head = not later or (head_from is not None and point.index > head_from)
                if has_norm and head and output_var < self.t["head_output_var"]:
                    continue
                if carried >= ff:
                    yield self._finding(lp, k, evidence={"variance_jump": jump, "carried": carried},
                                        how=self._how(jump, var_out, power, carried, bool(later)))
                    continue
            if k >= wf and (found := self._above_peers(probe, lp, k, peers.get(point.index, []))
                            or self._above_other_stages(probe, lp, k,
                                                        other_stages.get(point.index, []))):
                yield found
            elif k <= 1 / self.t["shrink_factor"] and jump <= 1 / ff and later \
                    and (head_from is None or point.index < head_from):
                # Small logits from a small head (the layers after the last norm, or the last
                # layer) are a deliberate start (BERT, ViT, torchvision's classifiers): not
                # judged. A later norm that restores the scale undoes the shrink.
                later += [v / power for i, v in norm_powers.items() if i > point.index]
                # What later layers were actually fed, read off their own outputs: a residual
                # stream or a norm the probe does not see (a hand-written RMSNorm) that restores
                # the scale shows there, whatever the graph order says.
                later += [fed / power for x in judged if x.point.index > point.index
                          and (fed := probe.fed_power(x)) is not None]
                # The output itself: in the last block of a pre-norm transformer no later
                # layer reads the restored stream, but the final norm hands it on (Arcee's
                # ReLU^2 MLP at std 0.02 is 0.007x He; its output is RMSNorm's, ~1).
                if probe.output_power is not None:
                    later.append(probe.output_power / power)
                if probe.output_normalised:
                    # A norm ends the network (Dory's L2 normalisation: each row's RMS is
                    # 1/sqrt(d) by design): whatever scale came before, it restores it.
                    continue
                carried = max(later)
                if carried <= 1 / ff:
                    yield self._finding(lp, k, evidence={"variance_jump": jump, "carried": carried},
                                        how=self._how(jump, var_out, power, carried, True))

    def _above_peers(self, probe: ProbeResult, lp: LayerProbe, k: float,
                     peers: list[LayerProbe]) -> Finding | None:
        """A layer far above the scheme and far above the same layer of the other blocks, in
        weight and in output variance: one block initialised apart from the rest. A
        normalisation after it (pre-LN transformers, mixers) restores the forward pass, so no
        distortion reaches later layers; the block's output drowns the residual stream it is
        added to and its weights barely move (tests/test_training_ln_scale.py)."""
        if not peers:
            return None
        wf = self.t["weight_factor"]
        var = probe.params[lp.point.weight].stats.std**2  # type: ignore[index]
        peer_vars = [probe.params[x.point.weight].stats.std**2  # type: ignore[index]
                     for x in peers]
        ratios = _ratios_to_peers(lp, var, peer_vars, peers)
        if ratios is None or ratios[0] < wf or ratios[1] < wf:
            return None
        ratio, out_ratio, peer_var = ratios
        std = math.sqrt(peer_var)
        w = user_expr(lp.point, lp.point.weight or "")
        fix = Fix(init="normal", std=std, fan_in=lp.point.fan_in, fan_out=lp.point.fan_out,
                  code=f"nn.init.normal_({w}, std={std:.4g})  # the median std of its peers")
        return self.finding(
            lp, f"{lp.point.layer}.weight variance is {ratio:.3g}x the median of the same layer "
                f"in the {len(peers)} other block(s) ({_peer_names(peers)}) and {k:.3g}x what "
                f"{recommended_init(lp.point).init} gives; its output variance is {out_ratio:.3g}x "
                f"theirs. The norm after it hides this from the forward pass, but the branch "
                f"drowns the residual stream it is added to and its weights barely move in "
                f"training. Re-initialise it like its peers: normal(0, {std:.3g}).",
            evidence={"variance_ratio": k, "peer_ratio": ratio, "peer_output_ratio": out_ratio},
            fix=fix, parameters=[lp.point.weight or ""])

    def _above_other_stages(self, probe: ProbeResult, lp: LayerProbe, k: float,
                            peers: list[LayerProbe]) -> Finding | None:
        """A layer `stage_factor` times above the same layer of the other stages, relative to
        the scheme (their widths differ), in weight and in output variance: a whole stage
        initialised apart from the rest, where the same layer of its own stage is no yardstick
        (convnext_atto's third stage holds 6 of its 12 blocks). Behind LayerScale at 1e-6 the
        stage's outputs reach nothing at step 0, but under AdamW its weights move 28-106x less
        relative to their size than the library's stage over 10 steps
        (tests/test_training_stage_scale.py)."""
        if not peers:
            return None
        sf = self.t["stage_factor"]
        peer_ks = [probe.params[x.point.weight].stats.std**2 / t  # type: ignore[index]
                   for x in peers if (t := target_variance(x.point))]
        ratios = _ratios_to_peers(lp, k, peer_ks, peers)
        if ratios is None or ratios[0] < sf or ratios[1] < sf:
            return None
        ratio, out_ratio, peer_k = ratios
        fix = recommended_init(lp.point)
        std = math.sqrt(peer_k * (target_variance(lp.point) or 0.0))
        w = user_expr(lp.point, lp.point.weight or "")
        return self.finding(
            lp, f"{lp.point.layer}.weight variance is {ratio:.3g}x that of the same layer in "
                f"the other stages ({_peer_names(peers)}), relative to {fix.init} for each "
                f"one's fan-in, and {k:.3g}x what {fix.init} gives; its output variance is "
                f"{out_ratio:.3g}x theirs. A stage initialised apart from the rest: the norms "
                f"and layer scales around it hide this from the forward pass, but its weights "
                f"barely move in training (Adam's steps do not grow with the weight). "
                f"Re-initialise it like the other stages: normal(0, {std:.3g}).",
            evidence={"variance_ratio": k, "stage_ratio": ratio, "stage_output_ratio": out_ratio},
            fix=Fix(init="normal", std=std, fan_in=lp.point.fan_in, fan_out=lp.point.fan_out,
                    code=f"nn.init.normal_({w}, std={std:.4g})  # the other stages' scale"),
            parameters=[lp.point.weight or ""])

    @staticmethod
    def _how(jump: float, var_out: float, power: float, carried: float, has_later: bool) -> str:
        where = ("every later layer's input" if carried >= 1 else "no later layer's input") \
            if has_later else "the network's output"
        return (f"its output variance is {jump:.3g}x the second moment of its input ({var_out:.3g} "
                f"vs {power:.3g}) and {where} stays {carried:.3g}x off")

    def _finding(self, lp: LayerProbe, k: float, *, evidence: dict[str, float], how: str) -> Finding:
        fix = recommended_init(lp.point)
        direction = "too large" if k > 1 else "too small"
        return self.finding(
            lp, f"{lp.point.layer}.weight variance is {k:.3g}x what {fix.init} gives for "
                f"fan_in={lp.point.fan_in} ({direction}); {how}. Re-initialise with {fix.init} "
                f"(std {fix.std:.3g}).",
            evidence={"variance_ratio": k, **evidence}, fix=fix, parameters=[lp.point.weight or ""])


class _BackedScale:
    """The library's own scale for its BatchNorm-backed layers, in both of Kaiming's fan modes.
    A whole network initialised above He (timm's Inception, std 0.1) is one choice, not one
    layer's defect; so is a network started at fan-out (torchvision's and timm's CNNs), where a
    layer with far more inputs than outputs sits far above He fan-in by design (timm's BAT
    attention: `ba.conv1` reads 128 channels and writes 2, 64x He fan-in, 1x fan-out). A layer
    is far above the library only when it is so in both modes."""

    def __init__(self, probe: ProbeResult, backed: list[LayerProbe]) -> None:
        self.ks: dict[str, dict[int, float]] = {}
        self.medians: dict[str, float] = {}
        for mode in ("fan_in", "fan_out"):
            ks = {lp.point.index: probe.params[lp.point.weight].stats.std**2 / t  # type: ignore[index]
                  for lp in backed if (t := target_variance(lp.point, mode))}
            self.ks[mode] = ks
            self.medians[mode] = statistics.median(ks.values()) if ks else 1.0
        # Fewer than three layers make no library scale to compare against.
        self.known = set(self.ks["fan_in"]) if len(self.ks["fan_in"]) >= 3 else set()

    def far_above(self, index: int, factor: float) -> bool:
        return index in self.known and all(
            ks[index] >= factor * max(self.medians[mode], 1.0) for mode, ks in self.ks.items())


def _input_powers(probe: ProbeResult) -> dict[int, float]:
    """E[x^2] of the value feeding each probe point: the last probed value before it, or the
    unit-variance probe batch. The second moment, not the variance, is what a weight multiplies
    (ReLU outputs have a large mean)."""
    powers, last = {}, 1.0
    for lp in probe.layers:
        powers[lp.point.index] = last
        if lp.activation is not None:
            last = lp.activation.var + lp.activation.mean**2
    return powers


def _same_role_peers(probe: ProbeResult, judged: list[LayerProbe]) -> dict[int, list[LayerProbe]]:
    """For each layer, the same layer in the other blocks: the same weight name up to its
    numbers (`blocks.1.attn.qkv` ~ `blocks.7.attn.qkv`) and the same shape. Libraries start
    those alike, or scale them gently with depth (BEiT's 1/sqrt(2 * layer_id): 7x in variance
    between the first block and the median of twelve, and below the scheme)."""
    groups: dict[tuple, list[LayerProbe]] = {}
    for lp in judged:
        stats = probe.params[lp.point.weight].stats  # type: ignore[index]
        if stats.constant or stats.nonfinite:
            continue
        groups.setdefault((layer_kind(lp.point.weight or ""), tuple(stats.shape)),
                          []).append(lp)
    return {lp.point.index: [x for x in group if x is not lp]
            for group in groups.values() if len(group) > 1 for lp in group}


def _ratios_to_peers(lp: LayerProbe, own: float, peer_values: list[float],
                     peers: list[LayerProbe]) -> tuple[float, float, float] | None:
    """`own` over the median of `peer_values`, the layer's output variance over the median of
    its peers', and that first median; None when a median is not positive or the output
    variance is not finite."""
    if not peer_values:
        return None
    peer_value = statistics.median(peer_values)
    peer_out = statistics.median(x.activation.var for x in peers)  # type: ignore[union-attr]
    out = lp.activation.var  # type: ignore[union-attr]
    if not (peer_value > 0 and peer_out > 0 and math.isfinite(out)):
        return None
    return own / peer_value, out / peer_out, peer_value


def _other_stage_peers(probe: ProbeResult, judged: list[LayerProbe]
                       ) -> dict[int, list[LayerProbe]]:
    """For each layer, the same layer (weight name up to its numbers, any shape) in the other
    stages: a stage is the name up to its first number (`stages.2` of
    `stages.2.blocks.0.mlp.fc1`, `layer3` of `layer3.1.conv2`)."""
    groups: dict[str, list[LayerProbe]] = {}
    for lp in judged:
        stats = probe.params[lp.point.weight].stats  # type: ignore[index]
        if not (stats.constant or stats.nonfinite) and _stage(lp.point.weight or ""):
            groups.setdefault(layer_kind(lp.point.weight or ""), []).append(lp)
    return {lp.point.index: [x for x in group
                             if _stage(x.point.weight or "") != _stage(lp.point.weight or "")]
            for group in groups.values() for lp in group}


def _stage(name: str) -> str:
    found = re.match(r"^.*?\d+", name)
    return found.group(0) if found else ""


def _peer_names(peers: list[LayerProbe]) -> str:
    names = [p.point.layer for p in peers]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"


def _update_reference(probe: ProbeResult, in_scale: list[LayerProbe], index: int,
                      each_side: int = 4) -> float | None:
    """The relative update |g|/|w| a BatchNorm-backed layer at the library's scale gets at this
    depth: the median over the nearest such layers before it and the median over the nearest
    after it, their geometric mean. At init |g|/|w| falls steadily with depth (100x from the
    first stage to the last in a RegNet), so a whole stage is judged against the stages on
    either side of it, not against the network's median, which a large planted stage drags
    toward itself."""
    def median_of(side: list[LayerProbe]) -> float | None:
        values = [probe.params[lp.point.weight].stats.grad_to_weight  # type: ignore[index]
                  for lp in side]
        values = [v for v in values if v > 0 and math.isfinite(v)]
        return statistics.median(values) if values else None

    before = median_of([lp for lp in in_scale if lp.point.index < index][-each_side:])
    after = median_of([lp for lp in in_scale if lp.point.index > index][:each_side])
    sides = [v for v in (before, after) if v]
    return math.prod(sides) ** (1 / len(sides)) if sides else None


def _compared_behind_bn(probe: ProbeResult, lp: LayerProbe) -> bool:
    """Depthwise kernels (one input channel per unit) behind BatchNorm are not compared: a 1x1
    one is a per-channel scale the norm removes entirely, and with 9-49 inputs per unit |g|/|w|
    is noise (timm's RepViT and SHViT start theirs far above Xavier and train). Pointwise and
    grouped convolutions with a few dozen inputs (ShuffleNet's 24- and 48-channel stages) are.
    Nor is a layer behind a global pool (a selective-kernel or squeeze-excite projection, one
    position per sample): its gradient sums over the samples, a spatial layer's over every
    position too, and the softmax or sigmoid gate it feeds scales it again (timm's skresnet50d
    starts its `attn.fc_reduce` at ~16x He fan-in, fan-out init, and |g|/|w| reads 1e-6 to
    1e-2 of the convs around it). Nor is a layer whose output the gradient reaches at a
    handful of positions: max-pooled to a few cells, only the entries each window picked feed
    back (timm's BAT attention: `ba.conv1` has two output channels, pooled to 7-cell maps that
    gate the block; the gradient reaches ~1% of its entries, and its |g|/|w| reads ~170x below
    the convs around it at timm's fan-out init, still ~15x below at He fan-in)."""
    shape = probe.params[lp.point.weight].stats.shape  # type: ignore[index]
    depthwise = len(shape) >= 3 and shape[1] == 1
    reach = probe.gradient_reach_after(lp)
    return (not depthwise and (lp.point.fan_in or 0) >= MIN_FAN_IN_BEHIND_BN
            and not probe.behind_global_pool(lp)
            and (reach is None or reach >= MIN_GRADIENT_REACH))
