from __future__ import annotations

import math
from collections.abc import Iterator

from gradprobe.diagnostics.loaders.onnx_naming import is_anonymous
from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.depth_trend import layer_kind

# A block whose last value the gradient reaches at no more than this fraction of the entries it
# reaches one block before is read at some positions only.
_UNREAD_REACH = 0.5


class DeadGradients(Rule):
    """A parameter receives exactly zero gradient: it will never train.

    Why it matters: a parameter with a zero gradient keeps its initial value for ever (plain SGD;
    weight decay only shrinks it). Typical causes are a path the output does not depend on, a
    multiplication by a constant zero, or a detach()/integer cast in the middle of the model.
    Example: `y = x + 0 * self.proj(x)`, or a layer whose output goes through `.detach()`.
    Fix: find why no gradient flows to it (detach, integer cast, zero mask, unused branch) or
    remove the parameter.
    Thresholds: every entry of the gradient exactly 0 on the probe batch; an empty tensor (DINOv3
    without register tokens keeps a (1, 0, d) one) holds nothing to train. A parameter the exported
    forward never reads (no gradient at all) is info: an eval-mode export leaves out training-only
    parameters (wav2vec2's masked_spec_embed) and branches it did not take. So is one reader's copy
    of a tensor the file stores once for several layers when another reader gives it a gradient (a
    module shared by several blocks: torch sums the readers), and a tensor an ONNX exporter computed
    and named (`val_12`) that no layer reads as a weight: a folded constant such as an attention
    mask, not a parameter. So is a parameter of an attention whose softmax normalises over one
    position at the probe's input size (every output exactly 1: LeViT's last stage at 64 px, one
    token): its logits cannot move the output at that size, whatever the weights. So is one that
    reaches the output only through a select whose condition comes from token ids when no probe
    position selects it (pocket_tts's BOS latent, `where(input_ids == bos_id, ...)`). So is a
    single value read only as the bound of a min/max/clamp: a threshold, constant in the model
    (Apertus's xIELU `eps`, a buffer, which a dynamo ONNX file stores as a parameter), and a
    single value only written by a select where its mask says so (GPT-Neo's `finfo.min` in its
    masked attention scores, a constant a dynamo file stores as an initializer). A 1-D shift
    (`*bias`) in a network with normalisation is only info: a norm after it subtracts the mean,
    which cancels any shift (a conv bias before BatchNorm, timm's learnable affine before BN).
    So is a parameter of a block whose last value the gradient reaches at no more than half
    the entries it reaches one block before (the output reads only some of its positions):
    timm's class-token models, whose last block's relative-position tables and query pooling
    shape only the patch positions the head never reads (eager PyTorch gives them zero too).
    A tensor a zero blocks at the first step, where that zero gets a gradient and so moves, is
    judged at the second (Doge's `dt_proj` behind its zero-init `A`): info when it gets a
    gradient there. Measured with deliberate zero layers set to their textbook init (a zero head
    blocks every gradient at step 0 only), and not reported where another rule names the cause: the zero/constant
    weight itself, layers behind a fully dead ReLU or behind the point where the output stops
    depending on the input, non-finite values.
    """

    name = "dead-gradients"
    severity = Severity.ERROR

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        if probe.has_nonfinite:
            return
        index_of_layer: dict[str, int] = {}
        for lp in probe.layers:
            for name in lp.point.parameters:
                index_of_layer.setdefault(name, lp.point.index)
        dead_walls = [lp.point.index for lp in probe.activations("relu")
                      if lp.activation and lp.activation.dead_units >= 0.999]
        cut = probe.signal_cut()
        if cut is not None:
            # Upstream of where the output stops depending on the input every gradient is zero
            # as a consequence; zero-weights names the cut itself.
            dead_walls.append(cut.point.index)
        elif not probe.output_varies and probe.zero_tensors_outside_layers():
            dead_walls.append(len(probe.layers))  # a zero scale after the last probed value
        wall = max(dead_walls) if dead_walls else -1
        judged_by_symmetry = {lp.point.weight for lp in probe.layers if lp.point.weight}
        has_norm = probe.has_normalisation
        one_position = _single_position_attention(probe)
        # A weight whose layer output no longer depends on the input gets a zero gradient
        # because its input is zero: a consequence of the dead layer upstream.
        signal_lost = {lp.point.weight for lp in probe.layers
                       if lp.point.role in ("linear", "norm") and lp.point.weight
                       and lp.activation and lp.activation.sample_var == 0}
        for name, param in probe.params.items():
            s = param.stats
            if s.grad_norm != 0 or s.nonfinite or math.prod(s.shape) == 0:
                # An empty tensor holds nothing to train (DINOv3 built without register
                # tokens keeps a (1, 0, d) parameter).
                continue
            if name in judged_by_symmetry and (s.constant or name in probe.unblocked):
                continue
            if param.judged_at_step > 1:
                yield self._second_step(name, param.layer)
                continue
            if name in signal_lost:
                continue
            if index_of_layer.get(name, 10**9) < wall:
                continue
            if (probe.model.format == "onnx" and name not in index_of_layer
                    and is_anonymous(name.split("#", 1)[0])):  # `val_12#2`: an untied copy
                yield self._export_constant(name, param.layer)
                continue
            attention = _attention_of(name, probe, one_position)
            if attention is not None:
                yield self._single_position(name, param.layer, attention)
                continue
            trained_copies = [c for c in probe.model.copies_of(name) if c != name
                              and c in probe.params and probe.params[c].stats.grad_norm != 0]
            if trained_copies:
                yield self._trained_through_copies(name, param.layer, trained_copies)
                continue
            if not param.unused and has_norm and name.endswith("bias") and len(s.shape) <= 1:
                # A shift right before a normalisation: the norm subtracts the mean, so the
                # shift's gradient is exactly zero. A redundant parameter, not a broken one.
                yield self.finding(
                    param.layer, f"{name} gets exactly zero gradient: a normalisation after it "
                                 f"subtracts the mean, which cancels a shift. It is redundant "
                                 f"(harmless; it can be removed).",
                    evidence={"unused": False, "grad_norm": s.grad_norm},
                    severity=Severity.INFO, parameters=[name])
                continue
            gate = None if param.unused else probe.model.selection_gate(name)
            if gate is not None:
                yield self._not_selected(name, param.layer, gate)
                continue
            bound = None if param.unused or math.prod(s.shape) != 1 \
                else probe.model.bound_of(name)
            if bound is not None:
                yield self._threshold(name, param.layer, bound)
                continue
            fill = None if param.unused or math.prod(s.shape) != 1 \
                else probe.model.fill_of(name)
            if fill is not None:
                yield self._fill(name, param.layer, fill)
                continue
            unread = None if param.unused else _unread_positions(probe, param.layer)
            if unread is not None:
                yield self._unread(name, param.layer, *unread)
                continue
            why = ("the exported forward never reads it (a training-only parameter, such as "
                   "wav2vec2's masked_spec_embed, or a branch the export did not take)"
                   if param.unused else "its gradient is exactly zero on the probe batch")
            yield self.finding(
                param.layer, f"{name} will never train: {why}.",
                evidence={"unused": param.unused, "grad_norm": s.grad_norm},
                fix=Fix(advice="find the detach()/integer cast/zero mask that cuts the gradient, "
                               "or remove the parameter"),
                severity=Severity.INFO if param.unused else None, parameters=[name],
                nodes=[lp.point.node for lp in probe.layers if name in lp.point.parameters][:5])

    def _excused(self, name: str, layer: str, message: str, **evidence: object) -> Finding:
        """A zero gradient the model's training would not see: info, with the reason."""
        return self.finding(layer, message,
                            evidence={"unused": False, "grad_norm": 0.0, **evidence},
                            severity=Severity.INFO, parameters=[name])

    def _single_position(self, name: str, layer: str, attention: str) -> Finding:
        # A softmax over one element is 1 whatever its logits, so its Jacobian is exactly zero:
        # what only shapes those logits (LeViT's attention biases when the last stage has one
        # token left at 64 px, T5's relative-position bias with one token) does not move the
        # output. The input size did this, not the weights; at the size the model is trained
        # at the same parameter trains.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient because the softmax in {attention} "
            f"normalises over one position at this input size (every output is exactly "
            f"1, whatever the logits): what only shapes those logits has no effect on "
            f"the output. Not a defect of the weights; probe at the input size you "
            f"train at (at this one, that attention is a no-op).",
            single_position_softmax=attention)

    def _not_selected(self, name: str, layer: str, gate: str) -> Finding:
        # pocket_tts's learnt BOS latent enters through `where(input_ids == bos_id, ...)`: random
        # tokens hold no BOS, so that select passes none of it on. Every real sequence starts
        # with one, and there it trains. The batch decided this zero, not the model.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient on the probe batch: it reaches the "
            f"output only through {gate}, a select whose condition comes from an "
            f"integer input (token ids), and no position of the probe batch selects it "
            f"(a special token's vector, such as a BOS embedding). Lint with inputs "
            f"that contain that token (--input) to judge it.",
            selection_gate=gate)

    def _second_step(self, name: str, layer: str) -> Finding:
        # Doge's dynamic mask is exp(A * softplus(dt_proj(v))) with A zero-initialised: at step
        # 0 the mask is 1 everywhere and dt_proj's gradient is A times something, exactly zero.
        # A gets a gradient, moves at the first step, and dt_proj trains from the second.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient at the first step only: a zero tensor on its "
            f"path blocks it, and that zero gets a gradient of its own, so it moves at the first "
            f"step; at the second step {name} gets a gradient. A deliberate zero start "
            f"elsewhere (a zero-init gate or scale), not a dead parameter.",
            judged_at_step=2)

    def _threshold(self, name: str, layer: str, bound: str) -> Finding:
        # Apertus's xIELU computes `where(x > 0, ..., expm1(min(x, eps)) ...)`: min passes eps
        # on only where x > eps, and there the select takes the other branch. eps is a buffer;
        # a dynamo ONNX file stores buffers as it stores parameters.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient: it is a single value read only as a bound of "
            f"{bound} (a threshold), and no position where it was the bound reaches the output "
            f"on the probe batch. Models keep such a threshold constant (an ONNX file stores "
            f"buffers as it stores parameters); only if yours is meant to train does it never "
            f"move.",
            bound=bound)

    def _fill(self, name: str, layer: str, select: str) -> Finding:
        # GPT-Neo writes finfo.min into the masked attention logits with a `where`; the softmax
        # after it turns those into exact zeros, so the value gets no gradient. A dynamo ONNX
        # file stores that constant as an initializer.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient: it is a single value that {select} only writes "
            f"where its mask says so (a masked fill, such as the large negative number put into "
            f"masked attention scores), and nothing downstream depends on it. Models keep such "
            f"a value constant (an ONNX file stores constants as it stores parameters).",
            fill=select)

    def _trained_through_copies(self, name: str, layer: str, copies: list[str]) -> Finding:
        # The file stores this tensor once and other layers read it too. A module shared by
        # several blocks (CoaT's relative-position convs, one per scale, called by every block
        # of that scale) exports like this, and torch's gradient of the shared parameter is the
        # sum over its readers: one reader whose use misses the output adds zero, it does not
        # stop the tensor training. Equal-valued distinct parameters merged by the exporter
        # look the same in the file, so the rule says what it cannot tell, as info.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient through this layer, but the file stores "
            f"it as one tensor that {len(copies)} other layer(s) also read and give a "
            f"gradient: as stored, it trains. Only if these were separate parameters "
            f"in your model does this one never train.",
            trained_copies=copies[:5])

    def _unread(self, name: str, layer: str, last: LayerProbe, peer: LayerProbe) -> Finding:
        # timm's class-token models (mvitv2_small_cls, vit_relpos_medium_patch16_cls_224): the
        # head reads only the class token, and the last block's relative-position tables and
        # query pooling shape only the other positions (the class token's bias row is padded
        # with zeros). Eager PyTorch gives them exactly zero gradient too; the library's
        # structure, not a value, cuts them off, and they change nothing the output reads.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient: it shapes only positions of its block that "
            f"the output never reads (the gradient reaches {last.gradient_reach:.0%} of "
            f"{last.point.layer}'s entries, {peer.gradient_reach:.0%} of {peer.point.layer}'s: "
            f"a head that reads a class token, or a pooling after the block). It never trains "
            f"and changes nothing the output reads; remove it unless those positions are read "
            f"elsewhere.",
            unread_positions=True)

    def _export_constant(self, name: str, layer: str) -> Finding:
        # A float initializer under a name the exporter made up that no layer reads as its
        # weight or bias: a value the export computed and stored (the dynamo exporter folds
        # torchvision Swin3D's shifted-window mask, filled with region ids, into `val_1748`),
        # not one of the model's parameters. It reaches the output through comparisons only.
        return self._excused(
            name, layer,
            f"{name} gets exactly zero gradient; the exporter named it and no layer reads "
            f"it as a weight or bias: a constant the export computed (a mask, a table), "
            f"not a parameter of the model.",
            anonymous=True)


def _unread_positions(probe: ProbeResult, layer: str) -> tuple[LayerProbe, LayerProbe] | None:
    """The last probed value of `layer`'s block (its name up to the last number) and the same
    value one block before, when the gradient reaches at most half as many of the block's
    entries as it reaches of the block before: the output reads only some of its positions.
    None otherwise, or when either reach is unknown."""
    block = _block_of(layer)
    if not block:
        return None
    inside = [lp for lp in probe.layers if lp.point.layer.startswith(block + ".")
              and lp.gradient_reach]
    if not inside:
        return None
    last = inside[-1]
    kind = layer_kind(last.point.layer)
    before = [lp for lp in probe.layers if lp.point.index < last.point.index
              and _block_of(lp.point.layer) != block and layer_kind(lp.point.layer) == kind
              and lp.gradient_reach is not None]
    if not before or last.gradient_reach > _UNREAD_REACH * (before[-1].gradient_reach or 0.0):
        return None
    return last, before[-1]


def _block_of(layer: str) -> str:
    parts = layer.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:numbered[-1] + 1]) if numbered else ""


def _single_position_attention(probe: ProbeResult) -> list[str]:
    """Modules holding a softmax whose every output is exactly 1: it normalises over a single
    element (over two or more, some entry of each row is below 1). `attn:softmax` (a traced
    functional call) and `attn.softmax` (a module, or an ONNX node in `attn`'s scope) both
    belong to `attn`."""
    modules = []
    for lp in probe.activations("softmax"):
        a = lp.activation
        if a is None or a.nonfinite or a.numel == 0 or not (a.min == a.max == 1.0):
            continue
        base, functional, _ = lp.point.layer.partition(":")
        module = base if functional else base.rpartition(".")[0]
        if module:
            modules.append(module)
    return modules


def _attention_of(name: str, probe: ProbeResult, modules: list[str]) -> str | None:
    """The module among `modules` that the parameter belongs to, by its name or its layer's,
    or by those of the other layers reading the same stored tensor (the dynamo exporter stores
    LeViT's equal, gathered attention biases once: `index_14`, and the loader names the other
    readers' copies by their scope, `...blocks.1.attn.index_14`)."""
    for copy in [name, *probe.model.copies_of(name)]:
        param = probe.params.get(copy)
        where = [copy] + ([param.layer] if param is not None else [])
        for module in modules:
            if any(w == module or w.startswith(module + ".") for w in where):
                return module
    return None
