"""Live models: gradprobe.diagnose on an nn.Module, a ScriptModule, an ExportedProgram."""

from __future__ import annotations

import warnings

import pytest
import torch
from defects import DEFECTS
from torch import nn
from zoo import ResNet, TextEncoder, build, example_inputs, export_torchscript

import gradprobe
from gradprobe.diagnostics.errors import GradprobeError, InputSpecError, ModelLoadError
from gradprobe.diagnostics.options import DiagnoseOptions


def _keys(report: gradprobe.Report) -> set[tuple[str, str, str]]:
    return {(f.rule, f.layer, f.severity.value) for f in report.findings}


def _state(model: nn.Module) -> dict:
    """Everything the probe must leave alone, as raw bytes where it is a tensor."""
    def raw(t: torch.Tensor | None):
        return None if t is None else (t.dtype, tuple(t.shape), t.detach().cpu().reshape(-1)
                                       .view(torch.uint8).clone())
    return {
        "params": {n: (raw(p), p.requires_grad, raw(p.grad), id(p.grad))
                   for n, p in model.named_parameters()},
        "buffers": {n: raw(b) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y, strict=True))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y
    return eq(a, b)


def test_model_left_exactly_as_it_was():
    """Training mode with BatchNorm, a frozen stem, gradients from an earlier step: the
    parameters, running statistics, flags, .grad (same objects) and RNG state all survive."""
    torch.manual_seed(0)
    model = ResNet().train()
    model.conv1.weight.requires_grad_(False)
    x = example_inputs("resnet")
    model(*x).sum().backward()  # existing .grad and running statistics moved off their init
    model.layer1.eval()  # a mixed train/eval tree
    before = _state(model)
    report = gradprobe.diagnose(model, x)
    assert report.layers and report.model.format == "pytorch"
    assert _same(before, _state(model))


def test_planted_zero_weight_is_restored_and_named_by_module_path():
    model, x = DEFECTS["zero_hidden"]()
    before = _state(model)
    report = gradprobe.diagnose(model, x)
    assert _same(before, _state(model))  # the probe's temporary unblocking is undone
    finding = next(f for f in report.findings if f.rule == "zero-weights")
    assert finding.layer == "net.2"
    assert finding.fix.code.startswith("nn.init.kaiming_normal_(model.net[2].weight")
    assert report.model.inputs[0].source == "example"
    assert any("example inputs given by the caller" in n for n in report.model.notes)


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_parity_with_the_torchscript_file(name, tmp_path):
    """Same findings (rule, layer, severity) live and from the traced file, on the same batch."""
    model, x = DEFECTS[name]()
    batch = tmp_path / "batch.pt"
    torch.save(list(x), batch)
    live = gradprobe.diagnose(model, x)
    path = export_torchscript(model, x, tmp_path / "model.pt")
    from_file = gradprobe.diagnose(path, DiagnoseOptions(input_file=str(batch)))
    assert _keys(live) == _keys(from_file)
    assert [lr.name for lr in live.layers] == [lr.name for lr in from_file.layers]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "vit", "text_encoder", "lstm"])
def test_parity_on_zoo_architectures(name, tmp_path):
    """BatchNorm, attention, embeddings and a recurrent cell: the same findings and layers."""
    model, x = build(name), example_inputs(name)
    batch = tmp_path / "batch.pt"
    torch.save(list(x), batch)
    live = gradprobe.diagnose(model, x)
    path = export_torchscript(model, x, tmp_path / "model.pt")
    from_file = gradprobe.diagnose(path, DiagnoseOptions(input_file=str(batch)))
    assert _keys(live) == _keys(from_file)
    assert [lr.name for lr in live.layers] == [lr.name for lr in from_file.layers]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_is_probed_where_it_lives_and_left_as_it_was():
    torch.manual_seed(0)
    model = ResNet().cuda().train()
    x = example_inputs("resnet")[0].cuda()
    model(x).sum().backward()
    before, cuda_rng = _state(model), torch.cuda.get_rng_state()
    report = gradprobe.diagnose(model, x)
    assert report.device.startswith("cuda")
    assert _same(before, _state(model)) and torch.equal(cuda_rng, torch.cuda.get_rng_state())
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_dict_of_keyword_inputs_and_integer_ids():
    torch.manual_seed(0)
    model = TextEncoder()
    ids = example_inputs("text_encoder")[0]
    report = gradprobe.diagnose(model, {"ids": ids})
    assert report.model.inputs[0].name == "ids" and report.model.inputs[0].dtype == "int64"
    assert any(lr.name.startswith("embed") for lr in report.layers)


def test_script_module_and_options_by_keyword():
    model = build("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    scripted.train()
    report = gradprobe.diagnose(scripted, input_shapes=[[4, 16]], seed=3)
    assert report.seed == 3 and report.model.inputs[0].shape == [4, 16]
    assert scripted.training  # put back


@pytest.mark.parametrize("call, error, words", [
    (lambda: gradprobe.diagnose(nn.Linear(4, 2)), InputSpecError, "example inputs"),
    (lambda: gradprobe.diagnose(object()), ModelLoadError, "nn.Module"),
    (lambda: gradprobe.diagnose(nn.Linear(4, 2), "x"), InputSpecError, "tensor"),
    (lambda: gradprobe.diagnose(nn.Linear(4, 2), torch.randn(2, 5)), ModelLoadError, "could not"),
    (lambda: gradprobe.diagnose(nn.Linear(4, 2), torch.randn(2, 4), batch_size=0), GradprobeError,
     "batch_size"),
    (lambda: gradprobe.diagnose(nn.Linear(4, 2), torch.randn(2, 4), device="cuda"), GradprobeError,
     "lives on cpu"),
])
def test_what_it_cannot_take_is_a_gradprobe_error_in_library_words(call, error, words):
    with pytest.raises(error, match=words) as caught:
        call()
    assert "--" not in str(caught.value)


def test_client_refuses_a_live_module_before_any_traffic():
    from gradprobe.client.api import Client

    with Client("127.0.0.1:9") as client, pytest.raises(ModelLoadError, match="export"):
        client.diagnose(nn.Linear(4, 2))


def test_fix_reinitialises_flagged_tensors_in_place_and_keeps_deliberate_zeros():
    model, x = DEFECTS["zero_hidden"]()
    weight = model.net[2].weight
    result = gradprobe.fix(model, x)
    assert model.net[2].weight is weight and weight.abs().max() > 0  # same tensor, new values
    assert [c.name for c in result.changed] == ["net.2.weight"]
    assert result.changed[0].scheme == "he_normal"
    assert not [f for f in result.after.findings if f.severity.value == "error"]
    assert model.training  # flags put back

    model, x = DEFECTS["zero_head"]()  # deliberate: reported as info, left as it is
    result = gradprobe.fix(model, x)
    assert result.changed == [] and model.net[6].weight.abs().max() == 0
    assert any(n.startswith("net.6.weight") for n in result.left_alone)


def test_fix_from_a_report_with_lsuv_and_select():
    model, x = DEFECTS["large_init"]()
    report = gradprobe.diagnose(model, x)
    assert any(f.rule == "init-scale" for f in report.findings)
    untouched = gradprobe.fix(model, report, select=["zero-weights"])
    assert untouched.changed == []
    result = gradprobe.fix(model, report, init="lsuv")
    assert {c.name for c in result.changed} >= {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert all(layer.converged for layer in result.lsuv)
    assert not any(f.rule == "init-scale" for f in result.after.findings)


def test_check_raises_init_error_with_the_report():
    model, x = DEFECTS["dead_relu"]()
    with pytest.raises(gradprobe.InitError, match="dead-relu") as caught:
        gradprobe.check(model, x)
    assert caught.value.report.summary.error >= 1
    healthy, x = DEFECTS["healthy_mlp"]()
    assert gradprobe.check(healthy, x).summary.error == 0
    with pytest.raises(gradprobe.GradprobeError, match="fail_on"):
        gradprobe.check(healthy, x, fail_on="sometimes")
