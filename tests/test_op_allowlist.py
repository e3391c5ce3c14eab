"""A TorchScript file is a program: only operators that compute may run, checked before any
of it runs (torch.jit.load included). Each attack is first shown to work on plain torch, then
shown to fail through gradprobe."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gradprobe.client.cli import main
from gradprobe.diagnostics.errors import UnsupportedOperator
from gradprobe.diagnostics.loaders.torchscript_loader import load_torchscript
from gradprobe.diagnostics.op_allowlist import (
    check_torchscript_archive,
    check_torchscript_module,
    is_allowed_torch_op,
)


def _script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _load_plain(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))


class WritesFile(nn.Module):
    """Creates (or overwrites) `target` with four 'A' bytes, then computes as usual."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        mapped = torch.from_file(self.target, True, 4, dtype=torch.uint8)
        mapped.copy_(torch.full([4], 65, dtype=torch.uint8))
        return self.fc(x) + mapped.sum().float() * 0


class RaisesFileContents(nn.Module):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        data = torch.from_file(self.secret, False, 9, dtype=torch.uint8)
        if bool(data.sum() > 0):
            raise ValueError("EXFIL " + str(data))
        return self.fc(x)


def _helper_writes(target: str, x: torch.Tensor) -> torch.Tensor:
    mapped = torch.from_file(target, True, 4, dtype=torch.uint8)
    mapped.fill_(66)
    return x + mapped.sum().float() * 0


class Inner(nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)

    @torch.jit.export
    def tamper(self, x: torch.Tensor) -> torch.Tensor:  # never called by forward
        return _helper_writes(self.target, x)


class Outer(nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.block = nn.Sequential(Inner(target), nn.ReLU())

    def forward(self, x):
        return self.block(x)


def _lint(capsys, path: Path) -> tuple[int, str]:
    code = main(["lint", str(path), "--input-shape", "2x4", "--format", "json"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_from_file_write_is_refused_by_the_cli_and_writes_nothing(tmp_path: Path, capsys) -> None:
    control = tmp_path / "control.bin"
    _load_plain(_script(WritesFile(str(control)), tmp_path / "control.pt"))(torch.randn(2, 4))
    assert control.read_bytes() == b"AAAA"  # the attack works on plain torch

    target = tmp_path / "written_by_model.pth"
    model = _script(WritesFile(str(target)), tmp_path / "writes.pt")
    code, output = _lint(capsys, model)
    assert code == 2, output
    assert "aten::from_file" in output and "forward" in output
    assert "Traceback" not in output
    assert not target.exists()


def test_raise_carrying_file_contents_is_refused_and_leaks_nothing(tmp_path: Path,
                                                                   capsys) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRET")
    with pytest.raises(Exception, match="EXFIL"):  # plain torch reads the file into the error
        _load_plain(_script(RaisesFileContents(str(secret)), tmp_path / "c.pt"))(torch.randn(2, 4))

    model = _script(RaisesFileContents(str(secret)), tmp_path / "leak.pt")
    code, output = _lint(capsys, model)
    assert code == 2, output
    assert "aten::from_file" in output
    assert "TOPSECRET" not in output and "84, 79, 80" not in output and "EXFIL" not in output


def test_from_file_in_a_nested_submodule_method_and_helper_is_found(tmp_path: Path) -> None:
    target = tmp_path / "nested.bin"
    model = _script(Outer(str(target)), tmp_path / "nested.pt")
    getattr(_load_plain(model).block, "0").tamper(torch.randn(2, 4))
    assert target.read_bytes() == b"BBBB"  # the method is reachable and does write
    target.unlink()

    with pytest.raises(UnsupportedOperator, match=r"aten::from_file.*block\.0\.tamper"):
        load_torchscript(model)
    assert not target.exists()


class SetsStateFromFile(nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.target = state[1]
        self.training = state[2]
        mapped = torch.from_file(self.target, True, 4, dtype=torch.uint8)
        mapped.fill_(67)
        self.w = state[0] + mapped.sum().float() * 0


def test_setstate_that_torch_jit_load_would_run_is_refused_before_loading(tmp_path: Path,
                                                                            capsys) -> None:
    control = tmp_path / "control.bin"
    control_model = _script(SetsStateFromFile(str(control)), tmp_path / "control.pt")
    control.unlink(missing_ok=True)  # scripting ran __getstate__ only; make sure
    _load_plain(control_model)
    assert control.read_bytes() == b"CCCC"  # torch.jit.load alone runs it

    target = tmp_path / "setstate.bin"
    model = _script(SetsStateFromFile(str(target)), tmp_path / "setstate.pt")
    target.unlink(missing_ok=True)
    code, output = _lint(capsys, model)
    assert code == 2, output
    assert "__setstate__" in output
    assert not target.exists()


def test_only_computing_operators_are_allowed() -> None:
    for name in ("aten::add", "aten::add.Tensor", "aten::conv2d", "aten::__getitem__.t",
                 "prim::If", "prim::Loop", "prim::RaiseException", "aten::format"):
        assert is_allowed_torch_op(name), name
    for name in ("aten::from_file", "aten::save", "prim::PythonOp", "prim::Print",
                 "prim::rpc_async", "aten::to_here", "prim::fork", "aten::set_.source_Storage",
                 "custom::add", "quantized::linear", "c10d::allreduce_", "prims::add",
                 "aten::brand_new_op_from_the_future", "add"):
        assert not is_allowed_torch_op(name), name


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.norm = nn.LayerNorm(8)

    def forward(self, x, steps: int = 2):
        outputs: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if i < steps:
                x = torch.relu(layer(x))
            else:
                x = torch.tanh(layer(x)) * 0.5
            outputs.append(x)
        if x.dim() != 2:
            raise ValueError("expected a batch of vectors, got " + str(x.dim()) + " dims")
        summary = {"mean": x.mean(), "last": outputs[-1].sum()}
        return self.norm(x) + summary["mean"] * 0


def _traced(model: nn.Module, args: tuple, path: Path, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model.eval(), args, **kwargs), str(path))
    return path


def _check_file(path: Path) -> None:
    check_torchscript_archive(path, path.name)
    check_torchscript_module(_load_plain(path), path.name)


@pytest.mark.slow
def test_real_library_models_are_not_refused(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    image = torch.randn(2, 3, 64, 64)
    files = [
        _traced(torchvision.models.resnet18(), (image,), tmp_path / "resnet18.pt"),
        _traced(torchvision.models.mobilenet_v3_small(), (image,), tmp_path / "mnv3.pt"),
        _traced(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
                (torch.randn(2, 3, 32, 32),), tmp_path / "vit.pt"),
        _traced(transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32)),
            (torch.randint(0, 100, (2, 8)),), tmp_path / "bert.pt", strict=False),
        _script(ControlFlow(), tmp_path / "control_flow.pt"),
        _script(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                                      2), tmp_path / "encoder.pt"),
        _script(nn.LSTM(4, 8, 2), tmp_path / "lstm.pt"),
    ]
    for path in files:
        _check_file(path)
    # and the loader itself takes the scripted control-flow module end to end
    assert load_torchscript(tmp_path / "control_flow.pt").probe_points


class GroupedExperts(nn.Module):
    """Two experts applied to their token groups with one grouped GEMM, as transformers' MoE
    layers do (`torch.nn.functional.grouped_mm`, traced as aten::_grouped_mm)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, 8, 8) / 8 ** 0.5)  # (expert, out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor([x.shape[0] // 2, x.shape[0]], dtype=torch.int32)
        return torch.nn.functional.grouped_mm(x, self.experts.transpose(-2, -1), offs=offsets)


def test_grouped_mm_of_mixture_of_experts_runs_with_torchs_gradient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = GroupedExperts()
    x = torch.randn(8, 8)
    path = _traced(module, (x,), tmp_path / "experts.pt", strict=False)
    model = load_torchscript(path)  # the allowlist takes aten::_grouped_mm
    out = model.run([x])[0]
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    (module(x) * cotangent).sum().backward()
    expected = torch.cat([x[:4] @ module.experts[0].T, x[4:] @ module.experts[1].T])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.parameters["experts"].grad, module.experts.grad)
