"""Healthy and planted models from the real libraries (timm, torchvision, transformers).

Every healthy-model claim rests on these: one model per family, built by the library at its own
default init (tiny configs, no downloads), exported as users do (TorchScript trace for most, the
legacy and dynamo ONNX exporters for a few). A healthy model must get no warning and no error;
a planted defect (tests/library_defects.py) must be found by its rule at the planted layer.
The full measurement over hundreds of architectures is bench/hub_sweep.py and
bench/planted_sweep.py; this file is the slice CI runs.
"""

from __future__ import annotations

import copy
import functools

import library_defects as defects
import library_zoo as zoo
import pytest

from gradprobe.diagnostics.api import diagnose

pytestmark = pytest.mark.slow

HEALTHY = [
    # (library, model, export)
    ("torchvision", "resnet18", "torchscript"),
    ("torchvision", "resnet18", "onnx_legacy"),
    ("torchvision", "mobilenet_v3_small", "torchscript"),
    ("torchvision", "efficientnet_b0", "torchscript"),
    ("torchvision", "regnet_y_400mf", "torchscript"),
    ("torchvision", "shufflenet_v2_x0_5", "torchscript"),
    ("torchvision", "squeezenet1_1", "torchscript"),
    ("timm", "resnet18", "torchscript"),
    ("timm", "regnety_002", "torchscript"),
    ("timm", "convnext_atto", "torchscript"),
    ("timm", "vit_tiny_patch16_224", "torchscript"),
    ("timm", "efficientnet_b0", "onnx_legacy"),
    ("transformers", "bert", "torchscript"),
    ("transformers", "bert", "onnx_dynamo"),
    ("transformers", "distilbert", "torchscript"),
    ("transformers", "roberta", "onnx_legacy"),
    ("transformers", "gpt2", "torchscript"),
    ("transformers", "t5", "torchscript"),
    ("transformers", "whisper", "torchscript"),
    ("transformers", "wav2vec2", "torchscript"),
    ("transformers", "llama", "torchscript"),
    ("transformers", "llama", "onnx_dynamo"),
    ("transformers", "arcee", "torchscript"),  # last block's ReLU^2 MLP at std 0.02: fired
    ("transformers", "dinov3_vit", "torchscript"),  # an empty register-token parameter: fired
    ("transformers", "dory", "torchscript"),  # L2-normalised output, std-0.02 o_proj: fired
    ("transformers", "fnet", "onnx_dynamo"),  # torch.fft as ONNX DFT: was unsupported
    ("transformers", "vit", "torchscript"),
    # a zero-initialised MoE router (uniform routing) computed just before the experts
    ("transformers", "afmoe", "torchscript"),
    # a fixed DCT stem, parallel 1x1 convs, a LayerNorm, then 0.02-init residual branches
    ("timm", "csatv2", "torchscript"),
    # HiFi-GAN's waveform tanh is the output, 76% saturated at transformers' init; it trains
    ("transformers", "vits", "torchscript"),
    # zero_init_last BatchNorm folded into the last conv of each block by the eval export, and
    # nothing after the residual add
    ("timm", "darknet17", "onnx_legacy"),
    # the same with a squeeze-excite at the end of each branch, fed the pooled zero
    ("timm", "seresnet18", "onnx_legacy"),
    # the dynamo exporter stores the attention mask's fill value as `scalar_tensor_default`: a
    # constant with no gradient, not a parameter that will never train
    ("torchvision", "swin_t", "onnx_dynamo"),
    # at 64 px the last stages' windows are zero-padded and cosine attention divides the padded
    # keys by its eps: a 1e10 gradient at `qkv` on rows whose input is zero, reaching no weight
    ("torchvision", "swin_v2_t", "torchscript"),
    # a sigmoid gate on the relative position bias, its gradient ~1e-5 of the convs before it
    ("transformers", "wavlm", "torchscript"),
    # at 64 px its last stage has one token: each attention's softmax is over one position, so
    # its attention biases get no gradient at that size (info, not "will never train")
    ("timm", "levit_256d", "torchscript"),
    # each stage's strided conv shrinks the residual stream ~10x and the LayerNorms reading it
    # hand back 1/scale in the gradient: a step per resolution, flat within each stage
    ("timm", "edgenext_small_rw", "torchscript"),
    # weight-standardised convs (ScaledStdConv2d), the last gain of each branch zero-initialised;
    # legacy ONNX keeps the standardisation as ops, so its convs have no stored weight
    ("timm", "nf_seresnet26", "torchscript"),
    ("timm", "nf_seresnet26", "onnx_legacy"),
    # the dynamo file stores gain * gamma / sqrt(fan_in) as one tensor: the unblocked pass
    # must restore a unit gain there, not ones (each branch 40x: an exploding-gradients error);
    # nf_seresnet50's also stores each zero gain and its BatchNorm's zero shift as one tensor
    ("timm", "nf_seresnet26", "onnx_dynamo"),
    ("timm", "nf_seresnet50", "onnx_dynamo"),
    # selective-kernel attention: `fc_reduce` behind the pool and BatchNorm, fan-out init ~16x He
    ("timm", "skresnet50d", "torchscript"),
    # at 64 px its last stage is 1x1: each BatchNorm there normalises 2 values per channel (batch
    # 2), and the gradient behind it is 1/|x1 - x2| (an exploding-gradients warning before)
    ("timm", "efficientvim_m4_dist", "torchscript"),
    # global-context attention: at batch 2 every BatchNorm averages over two samples, and the
    # one-channel attention convs between them read "2.3e6x exploding"; flat from batch 4
    ("timm", "gc_efficientnetv2_rw_t", "torchscript"),
    # GlobalContext's zero-init `mlp_add.fc2` before ByobNet's zero-init last BatchNorm: its
    # gradient is zero at the first step only (it trains from the second)
    ("timm", "gcresnext26ts", "torchscript"),
    # the folded zero-init bn3 followed by an ECA gate, whose Conv1d runs across pooled channels
    ("timm", "ecaresnetlight", "onnx_legacy"),
    # DETR's decoder starts from zero queries: the LayerNorm after its first self-attention
    # reads zeros and hands back the gradient over sqrt(eps) ("6.99e+03x exploding" before)
    ("transformers", "maskformer", "onnx_legacy"),
    # each stage ends in a block whose branches a LayerScale at 1e-5 scales: every gradient
    # inside is 1e-5 of the convs before it ("1.63e+03x exploding" over 6 layers)
    ("timm", "swiftformer_xs", "torchscript"),
    # a zero-init key scale (`temp`) stops the q/k path at the first step, zero conv biases
    # included; the router MLP's gradient grows towards its output within the module while one
    # line through the attention before it reads "991x exploding"
    ("transformers", "zaya", "torchscript"),
]

PLANTED = [
    # (family, defect, export)
    ("resnet18", "zero_branch", "torchscript"),
    ("resnet18", "nan_weight", "torchscript"),
    ("resnet18", "stage_10x", "torchscript"),
    ("resnet18", "bn_shift", "torchscript"),
    ("resnet18", "constant", "onnx_legacy"),
    ("shufflenet", "stage_10x", "torchscript"),
    ("mobilenetv3", "gate_zero", "torchscript"),
    ("efficientnet", "gate_zero", "torchscript"),
    ("convnext", "zero_branch", "torchscript"),
    # every block of the stage ends in a LayerScale at 1e-6, so its 100x outputs reach nothing
    # at step 0; the same layers of the other stages are the yardstick (half the blocks are
    # in this stage, so its own peers are not)
    ("convnext", "stage_10x", "torchscript"),
    ("vit", "constant", "torchscript"),
    ("vit", "zero_norm", "torchscript"),
    ("vit", "stage_10x", "torchscript"),
    ("bert", "zero_norm", "torchscript"),
    ("bert", "zero_branch", "torchscript"),
    ("bert", "nan_weight", "onnx_legacy"),
    ("gpt2", "constant", "torchscript"),
    ("t5-encoder", "zero_norm", "torchscript"),
    ("whisper-encoder", "stage_10x", "torchscript"),
    ("wav2vec2", "zero_norm", "torchscript"),
    # GroupNorm decomposed, its zeroed scale read by a Mul; zero mask constants in every block
    ("wav2vec2", "zero_norm", "onnx_dynamo"),
    # bn1 folded into conv1: the finding names bn1 as what may hold the zero
    ("resnet18", "zero_norm", "onnx_dynamo"),
    ("resnet18", "zero_norm", "onnx_legacy"),  # the file keeps no BatchNorm name
    ("llama", "gate_zero", "torchscript"),
    ("llama", "zero_branch", "torchscript"),
    # behind the zeroed stem BatchNorm every value is the same for each sample, but on some
    # CPUs the squeeze-excite gates differ by ~1 ulp across the batch: the cut must still be
    # the stem, not the last block
    ("regnet", "zero_norm", "torchscript"),
]


@functools.lru_cache(maxsize=4)
def _built(library: str, name: str) -> zoo.Built:
    return zoo.build(library, name)


def _serious(report) -> list:
    return [f for f in report.findings if f.severity.value in ("error", "warning")]


def _show(findings) -> str:
    return "\n".join(f"{f.severity.value} {f.rule} @ {f.layer}: {f.message}" for f in findings)


@pytest.mark.parametrize(("library", "name", "how"), HEALTHY,
                         ids=[f"{lib}-{n}-{h}" for lib, n, h in HEALTHY])
def test_healthy_library_model_is_clean(tmp_path, library, name, how):
    built = _built(library, name)
    report = diagnose(zoo.export(built, how, tmp_path), zoo.lint_options(built, how))
    assert report.layers, "the probe measured no layer"
    assert not _serious(report), f"false alarm on a healthy {library} {name}:\n" + _show(
        _serious(report))


@pytest.mark.parametrize(("family_name", "defect", "how"), PLANTED,
                         ids=[f"{f}-{d}-{h}" for f, d, h in PLANTED])
def test_planted_defect_is_found_at_its_layer(tmp_path, family_name, defect, how):
    family = defects.family_named(family_name)
    healthy = _built(family.library, family.name)
    planted = zoo.Built(healthy.library, healthy.name, copy.deepcopy(healthy.module),
                        healthy.inputs, healthy.parameters)
    changed = defects.plant(planted.module.model, defect, family.sites[defect])
    report = diagnose(zoo.export(planted, how, tmp_path), zoo.lint_options(planted, how))
    expected = defects.EXPECTED[defect]
    hits = [f for f in _serious(report) if expected is None or f.rule in expected]
    layers = defects.site_layers(family, defect)
    fold = defects.fold_target(healthy.module, healthy.inputs, family.sites[defect])
    located = [f for f in hits if defects.finding_at_site(f, layers, fold)]
    assert located, (f"{defect} planted at {layers[0]} ({', '.join(changed)}) not reported there "
                     f"by {sorted(expected) if expected else 'any rule'}; findings:\n"
                     + _show(_serious(report)))
    if defect in ("zero_norm", "gate_zero", "nan_weight", "zero_branch"):
        # The output stops depending on the input, a branch dies for good, or NaN spreads.
        assert any(f.severity.value == "error" for f in located), _show(located)
