"""Planted defects on real library models: where each one goes in each family, and how.

One representative per family (`FAMILIES`), built by `library_zoo.build` at the library's
default init. Each family lists the module path of every defect site it has; a family without a
site for a defect (no residual branch in VGG, no BatchNorm before a ReLU in a transformer, no
gate in a ResNet) skips it, with the reason in `SKIPPED`.

The defects (issue 10):
  zero_branch   the FIRST conv/linear of a residual branch zeroed (a zeroed LAST one is
                deliberate zero-init; the first kills the branch for good)
  nan_weight    one NaN entry in a weight
  stage_10x     every conv/linear weight of one stage (block) drawn at 10x He std
  constant      a projection weight filled with 0.02 (`fill_` where `normal_` was meant)
  zero_norm     a normalisation weight zeroed where it cuts the signal (the output no longer
                depends on the input)
  bn_shift      a BatchNorm shift of -10 right before a ReLU
  gate_zero     a squeeze-excite / gating projection stuck at exactly 0 (bias -200 behind a
                sigmoid, 0 behind a hard sigmoid; a zero gate projection behind SiLU)

Site paths are the library model's module paths; in an export they appear under `model.` (the
`FirstTensor` wrapper), which is the layer name a finding must carry to count as the right layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

DEFECTS = ("zero_branch", "nan_weight", "stage_10x", "constant", "zero_norm", "bn_shift",
           "gate_zero")

# Rules that count as detecting a defect (at warning or error). None: any rule, since the issue
# asks for an error at the first dead point without naming the rule.
EXPECTED: dict[str, frozenset[str] | None] = {
    "zero_branch": frozenset({"zero-weights"}),
    "nan_weight": frozenset({"nonfinite-weights"}),
    "stage_10x": frozenset({"init-scale", "exploding-activations", "exploding-gradients"}),
    "constant": frozenset({"constant-weights"}),
    "zero_norm": None,
    "bn_shift": frozenset({"dead-relu"}),
    "gate_zero": None,
}


@dataclass(frozen=True)
class Family:
    family: str
    library: str
    name: str
    sites: dict[str, str]
    # Other layers a finding may name for a defect and still be at the right place: the ReLU
    # right after a shifted BatchNorm (dead-relu reports the activation), the gate's sigmoid
    # right after a shut gate projection.
    also: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _cnn(branch: str | None, nan: str, stage: str, constant: str, norm: str,
         bn: str | None = None, relu: str | None = None, gate: str | None = None) -> dict:
    sites = {"zero_branch": branch, "nan_weight": nan, "stage_10x": stage, "constant": constant,
             "zero_norm": norm, "bn_shift": bn, "gate_zero": gate}
    return {k: v for k, v in sites.items() if v}


def _encoder(layer: str, ffn: str, query: str, value: str, norm: str, gate: str | None = None
             ) -> dict:
    """Transformer sites: `layer` is the per-block prefix ('encoder.layer.{}')."""
    sites = {"zero_branch": layer.format(0) + "." + ffn, "nan_weight": layer.format(1) + "." + query,
             "stage_10x": layer.format(1), "constant": layer.format(0) + "." + value,
             "zero_norm": norm}
    if gate:
        sites["gate_zero"] = layer.format(0) + "." + gate
    return sites


_BERT = _encoder("encoder.layer.{}", "intermediate.dense", "attention.self.query",
                 "attention.self.value", "embeddings.LayerNorm")
_VIT_TIMM = _encoder("blocks.{}", "mlp.fc1", "attn.qkv", "attn.proj", "norm")

FAMILIES: list[Family] = [
    # --- torchvision
    Family("resnet18", "torchvision", "resnet18",
           _cnn("layer1.0.conv1", "layer2.0.conv1", "layer3", "layer2.0.downsample.0", "bn1",
                bn="layer1.1.bn1"), also={"bn_shift": ("layer1.1.relu",)}),
    Family("regnet", "torchvision", "regnet_y_400mf",
           _cnn("trunk_output.block2.block2-1.f.a.0", "trunk_output.block3.block3-0.f.b.0",
                "trunk_output.block3", "trunk_output.block2.block2-0.proj.0", "stem.1",
                bn="trunk_output.block1.block1-0.f.a.1",
                gate="trunk_output.block2.block2-1.f.se.fc2"),
           also={"bn_shift": ("trunk_output.block1.block1-0.f.a.2",),
                 "gate_zero": ("trunk_output.block2.block2-1.f.se.scale_activation",)}),
    Family("efficientnet", "torchvision", "efficientnet_b0",
           _cnn("features.2.1.block.0.0", "features.3.0.block.1.0", "features.4", "features.8.0",
                "features.0.1", gate="features.2.0.block.2.fc2"),
           also={"gate_zero": ("features.2.0.block.2.scale_activation",)}),
    Family("mobilenetv3", "torchvision", "mobilenet_v3_small",
           _cnn("features.5.block.0.0", "features.6.block.1.0", "features.9", "features.12.0",
                "features.0.1", bn="features.1.block.0.1", gate="features.1.block.1.fc2"),
           also={"bn_shift": ("features.1.block.0.2",),
                 "gate_zero": ("features.1.block.1.scale_activation",)}),
    Family("densenet", "torchvision", "densenet121",
           _cnn("features.denseblock1.denselayer1.conv1", "features.denseblock2.denselayer1.conv1",
                "features.denseblock3.denselayer1", "features.transition1.conv", "features.norm0",
                bn="features.denseblock1.denselayer2.norm2"),
           also={"bn_shift": ("features.denseblock1.denselayer2.relu2",)}),
    Family("vgg", "torchvision", "vgg11_bn",
           _cnn(None, "features.4", "features.8", "classifier.3", "features.1", bn="features.5"),
           also={"bn_shift": ("features.6",)}),
    Family("shufflenet", "torchvision", "shufflenet_v2_x0_5",
           _cnn("stage2.1.branch2.0", "stage3.0.branch2.3", "stage3", "conv5.0", "conv1.1",
                bn="stage2.1.branch2.1"), also={"bn_shift": ("stage2.1.branch2.2",)}),
    # --- timm
    Family("resnet50", "timm", "resnet50",
           _cnn("layer1.0.conv1", "layer2.0.conv1", "layer3.1", "layer2.0.downsample.0", "bn1",
                bn="layer1.1.bn1"), also={"bn_shift": ("layer1.1.act1",)}),
    Family("regnety-timm", "timm", "regnety_002",
           _cnn("s3.b2.conv1.conv", "s4.b1.conv2.conv", "s3", "s2.b1.downsample.conv", "stem.bn",
                bn="s1.b1.conv1.bn", gate="s3.b2.se.fc2"),
           also={"bn_shift": ("s1.b1.conv1.bn.act",), "gate_zero": ("s3.b2.se.gate",)}),
    Family("efficientnet-timm", "timm", "efficientnet_b0",
           _cnn("blocks.2.1.conv_pw", "blocks.3.0.conv_dw", "blocks.4", "conv_head", "bn1",
                gate="blocks.1.0.se.conv_expand"),
           also={"gate_zero": ("blocks.1.0.se.gate",)}),
    Family("convnext", "timm", "convnext_atto",
           _cnn("stages.1.blocks.0.conv_dw", "stages.2.blocks.0.mlp.fc1", "stages.2",
                "stages.2.downsample.1", "stem.1")),
    Family("vit", "timm", "vit_tiny_patch16_224", _VIT_TIMM),
    Family("deit", "timm", "deit_tiny_patch16_224", _VIT_TIMM),
    Family("mixer", "timm", "mixer_s16_224",
           _encoder("blocks.{}", "mlp_channels.fc1", "mlp_tokens.fc1", "mlp_tokens.fc2", "norm")
           | {"constant": "stem.proj"}),
    # --- transformers (tiny configs; seq2seq models are their encoder)
    Family("bert", "transformers", "bert", _BERT),
    Family("roberta", "transformers", "roberta", _BERT),
    Family("distilbert", "transformers", "distilbert",
           _encoder("transformer.layer.{}", "ffn.lin1", "attention.q_lin", "attention.v_lin",
                    "embeddings.LayerNorm")),
    Family("gpt2", "transformers", "gpt2",
           _encoder("h.{}", "mlp.c_fc", "attn.c_attn", "attn.c_proj", "ln_f")),
    Family("t5-encoder", "transformers", "t5",
           _encoder("block.{}", "layer.1.DenseReluDense.wi", "layer.0.SelfAttention.q",
                    "layer.0.SelfAttention.v", "final_layer_norm")),
    Family("whisper-encoder", "transformers", "whisper",
           _encoder("layers.{}", "fc1", "self_attn.q_proj", "self_attn.v_proj", "layer_norm")),
    Family("wav2vec2", "transformers", "wav2vec2",
           _encoder("encoder.layers.{}", "feed_forward.intermediate_dense", "attention.q_proj",
                    "attention.v_proj", "feature_extractor.conv_layers.0.layer_norm")),
    Family("llama", "transformers", "llama",
           _encoder("layers.{}", "mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj", "norm",
                    gate="mlp.gate_proj")),
    Family("vit-hf", "transformers", "vit",
           _encoder("layers.{}", "mlp.fc1", "attention.q_proj", "attention.v_proj", "layernorm")),
]

SKIPPED = {
    "zero_branch": "no residual branch (plain conv stack)",
    "bn_shift": "no BatchNorm right before a ReLU",
    "gate_zero": "no gate in this architecture",
}


def family_named(name: str) -> Family:
    for f in FAMILIES:
        if f.family == name:
            return f
    raise KeyError(name)


def _weighted(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv / linear (incl. GPT-2's Conv1D) modules with a weight of 2-D or more."""
    found = []
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and not isinstance(m, nn.Embedding):
            found.append((name, m))
    return found


def _fan_in(m: nn.Module) -> int:
    w = m.weight
    if type(m).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return w.shape[0]
    return math.prod(w.shape[1:])


@torch.no_grad()
def plant(model: nn.Module, defect: str, site: str) -> list[str]:
    """Apply `defect` at `site` of the library model in place; return the changed parameters."""
    target = model.get_submodule(site)
    if defect == "stage_10x":
        changed = []
        for name, m in _weighted(target):
            m.weight.normal_(0.0, 10.0 * math.sqrt(2.0 / _fan_in(m)))
            changed.append(f"{site}.{name}.weight" if name else f"{site}.weight")
        return changed
    if defect in ("zero_branch", "zero_norm"):
        target.weight.zero_()
        return [f"{site}.weight"]
    if defect == "nan_weight":
        target.weight.view(-1)[3] = float("nan")
        return [f"{site}.weight"]
    if defect == "constant":
        target.weight.fill_(0.02)
        return [f"{site}.weight"]
    if defect == "bn_shift":
        target.bias.fill_(-10.0)
        return [f"{site}.bias"]
    if defect == "gate_zero":
        if getattr(target, "bias", None) is not None:  # sigmoid / hard-sigmoid gate: shut
            target.bias.fill_(-200.0)
            return [f"{site}.bias"]
        target.weight.zero_()  # SiLU gate (LLaMA's gate_proj): silu(0) = 0
        return [f"{site}.weight"]
    raise ValueError(f"unknown defect {defect!r}")


def site_layers(family: Family, defect: str) -> list[str]:
    """The layer names (export naming, under `model.`) a finding may carry for this defect."""
    return ["model." + p for p in (family.sites[defect], *family.also.get(defect, ()))]


def at_site(layer: str | None, layers: list[str], folded_norm: str | None = None) -> bool:
    """A finding is at the planted site when its layer is the site or a node inside it. The
    parameters a finding lists do not count: a depth-trend finding lists every layer of the
    trend, the planted one among them. A zeroed BatchNorm that an eval export folded into its
    conv is at the site when the finding names it as the folded BatchNorm (`folded_norm`: the
    dynamo exporter keeps its name)."""
    return any(name == p or name.startswith((p + ".", p + ":"))
               for name in (layer or "", folded_norm or "") if name for p in layers)


def finding_at_site(finding: object, layers: list[str], fold_target: str | None = None) -> bool:
    """`at_site` for a report Finding or a stored one (a dict with `layer`, `folded_norm`,
    `folded_batchnorm`). The legacy exporter keeps no trace of a BatchNorm it folded: the file's
    only place for a zeroed one is the conv it went into. A finding there that says a BatchNorm
    is folded into it is at the site, when `fold_target` (see `fold_target`) is that conv."""
    if isinstance(finding, dict):
        layer, evidence = finding.get("layer"), finding
    else:
        layer, evidence = getattr(finding, "layer", None), getattr(finding, "evidence", None) or {}
    if fold_target and evidence.get("folded_batchnorm") and at_site(layer, [fold_target]):
        return True
    return at_site(layer, layers, evidence.get("folded_norm"))


def fold_target(module: nn.Module, inputs: tuple[torch.Tensor, ...], site: str) -> str | None:
    """The export name (`model.` + module path) of the conv an eval export folds the BatchNorm
    at `site` of `module.model` into: the conv whose output is the BatchNorm's input, found by
    one forward pass on `inputs` with hooks. None when `site` is no BatchNorm or no conv feeds
    it."""
    model = module.model
    norm = model.get_submodule(site)
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return None
    # the tensors themselves, not their ids: a freed tensor's id can come back on another one
    outputs: list[tuple[torch.Tensor, str]] = []
    fed: list[torch.Tensor] = []

    def seen(name: str):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            outputs.append((out, name))
        return hook

    def feeds(m: nn.Module, args: tuple) -> None:
        fed.append(args[0])

    hooks = [m.register_forward_hook(seen(name)) for name, m in model.named_modules()
             if isinstance(m, nn.modules.conv._ConvNd)]
    hooks.append(norm.register_forward_pre_hook(feeds))
    try:
        with torch.no_grad():
            module.eval()(*inputs)
    finally:
        for h in hooks:
            h.remove()
    name = next((n for out, n in outputs if fed and out is fed[0]), None)
    return "model." + name if name else None
