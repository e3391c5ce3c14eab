"""A trace that froze a size taken from its example input's values (switch_transformers' tokens
per expert) fails on another batch of the same shape: a clear one-line input error (exit 2)
that says so and asks for the input the model was exported with, not a shape hint; with that
input the same file lints."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradprobe.client.cli import main
from gradprobe.diagnostics.api import diagnose


class PositiveRows(nn.Module):
    """Runs a layer once per row whose first entry is positive: a trace unrolls that loop for
    the example's count (TorchScript: a list of fixed length; ONNX: a Split of fixed sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x[x[:, 0] > 0]
        return torch.stack([self.lin(r) for r in kept.unbind(0)]).sum(0, keepdim=True) + self.lin(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(0)
    model = PositiveRows()
    x = torch.randn(4, 8)
    x[:, 0] = x[:, 0].abs() + 0.1  # every row kept; the probe's N(0, 1) batch keeps about half
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (x,), check_trace=False).save(str(root / "m.pt"))
        torch.onnx.export(model, (x,), str(root / "m.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    torch.save(x, root / "x.pt")
    return root


@pytest.mark.parametrize("name", ["m.pt", "m.onnx"])
def test_a_frozen_data_dependent_size_is_one_input_error_asking_for_the_export_input(
        capsys, exported, name):
    shape = ["--input-shape", "4x8"] if name.endswith(".pt") else ["--batch-size", "4"]
    code = main(["lint", str(exported / name), *shape])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "fixes sizes from the values of the input it was exported with" in lines[0]
    assert "pass --input FILE" in lines[0] and "--input-shape" not in lines[0], lines[0]
    options = {"input_shapes": [[4, 8]]} if name.endswith(".pt") else {"batch_size": 4}
    report = diagnose(str(exported / name), input_file=str(exported / "x.pt"), **options)
    assert report.layers and report.summary.error == 0
