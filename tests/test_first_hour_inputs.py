"""Issue 13, inputs: what a new user feeds the probe and the one line they get back when it
does not fit (fixed batch, fp16 TorchScript, float64 .npy, one dtype for mixed inputs, raw torch
errors, a model traced under no_grad)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.client.cli import main
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.errors import InputSpecError, ProbeError
from gradprobe.diagnostics.options import DiagnoseOptions


class FixedBatch(nn.Module):
    """Reshapes to its export batch, as a legacy export with a fixed batch does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).reshape(4, -1))


class FloatAndIds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.emb(ids)


def _trace(model: nn.Module, args: tuple, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, args).save(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    fixed = root / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FixedBatch().eval(), (torch.randn(4, 3, 8, 8),), str(fixed),
                          dynamo=False, input_names=["image"])
    half = _trace(FixedBatch().half(), (torch.randn(4, 3, 8, 8).half(),), root / "half.pt")
    mixed = _trace(FloatAndIds(), (torch.randn(2, 4), torch.zeros(2, dtype=torch.long)),
                   root / "mixed.pt")
    np.save(root / "x64.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)))
    return {"fixed": fixed, "half": half, "mixed": mixed, "x64": root / "x64.npy", "root": root}


def test_fixed_batch_against_input_shape_is_a_clear_error(files, capsys) -> None:
    with pytest.raises(InputSpecError, match=r"declares a fixed batch size of 4 .* 2x3x8x8"):
        diagnose(files["fixed"], DiagnoseOptions(input_shapes=[[2, 3, 8, 8]]))
    assert main(["lint", str(files["fixed"]), "--input-shape", "2x3x8x8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fixed batch size of 4" in err[0] and "Reshape" not in err[0]


def test_fixed_batch_against_batch_size_names_the_flag(files, capsys) -> None:
    with pytest.raises(InputSpecError, match="batch_size=4"):  # the library names the field
        diagnose(files["fixed"], DiagnoseOptions(batch_size=2))
    assert main(["lint", str(files["fixed"]), "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "fixed batch size of 4" in err and "--batch-size 4" in err
    assert "DiagnoseOptions" not in err  # the CLI words the advice as its flag


def test_folder_shape_is_not_forced_on_a_file_that_declares_its_own(files, tmp_path,
                                                                    capsys) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "fixed.onnx").write_bytes(files["fixed"].read_bytes())
    (folder / "mixed.pt").write_bytes(files["mixed"].read_bytes())
    code = main(["lint", str(folder), "--input-shape", "2x4", "--input-shape", "2",
                 "--input-dtype", "float32", "--input-dtype", "int64", "--format", "json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    import json

    reports = {Path(r["model"]["path"]).name: r for r in json.loads(out.out)["reports"]}
    assert reports["fixed.onnx"]["model"]["inputs"][0]["shape"] == [4, 3, 8, 8]
    assert reports["mixed.pt"]["model"]["inputs"][0]["shape"] == [2, 4]


def test_half_precision_torchscript_takes_half_inputs(files) -> None:
    report = diagnose(files["half"], DiagnoseOptions(input_shapes=[[4, 3, 8, 8]], device="cpu"))
    assert report.model.inputs[0].dtype == "float16"


def test_float64_npy_is_cast_to_the_model_dtype_with_a_note(files) -> None:
    report = diagnose(files["fixed"], DiagnoseOptions(input_file=str(files["x64"]),
                                                      device="cpu"))
    assert report.model.inputs[0].dtype == "float32"
    assert any("float64, cast to float32" in note for note in report.model.notes)


def test_one_dtype_for_a_float_and_an_int_input_asks_for_one_each(files, capsys) -> None:
    options = DiagnoseOptions(input_shapes=[[2, 4], [2]], input_dtypes=["int64"])
    with pytest.raises(InputSpecError, match=r"different kinds \(x float32, ids int64\)"):
        diagnose(files["mixed"], options)
    assert main(["lint", str(files["mixed"]), "--input-shape", "2x4", "--input-shape", "2",
                 "--input-dtype", "int64"]) == 2
    assert "--input-dtype float32 --input-dtype int64" in capsys.readouterr().err


def test_a_shape_the_graph_rejects_names_the_inputs_in_one_line(files, capsys) -> None:
    options = DiagnoseOptions(input_shapes=[[2, 4], [2, 3]], input_dtypes=["float32", "int64"])
    with pytest.raises(InputSpecError, match=r"rejected the shape of its inputs \(x 2x4 "
                                             r"float32, ids 2x3 int64\)"):
        diagnose(files["mixed"], options)
    assert main(["lint", str(files["mixed"]), "--input-shape", "2x4", "--input-shape", "2x3",
                 "--input-dtype", "float32", "--input-dtype", "int64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input-shape" in err[0] and "Traceback" not in err[0]


def test_a_dtype_the_graph_rejects_says_which_dtype_it_wants(files) -> None:
    # Asking for float32 on a float16 model: torch's own complaint becomes an input error that
    # names the weights' dtype and the inputs given.
    with pytest.raises(InputSpecError, match=r"rejected the dtype .*x 4x3x8x8 float32.*"
                                             r"weights are float16.*float16"):
        diagnose(files["half"], DiagnoseOptions(input_shapes=[[4, 3, 8, 8]],
                                                input_dtypes=["float32"], device="cpu"))


def test_attention_traced_under_no_grad_says_to_retrace(tmp_path) -> None:
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    # The fast path is what a user's torch takes by default (tests/zoo.py turns it off for
    # the whole session: exporters want the plain path), so turn it on for this trace.
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        with torch.no_grad():
            path = _trace(Attend().eval(), (torch.randn(2, 5, 16),), tmp_path / "attn.pt")
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    with pytest.raises(ProbeError, match=r"_native_multi_head_attention has no backward.*"
                                         r"re-trace it with gradients enabled"):
        diagnose(path, DiagnoseOptions(input_shapes=[[2, 5, 16]], device="cpu"))


def test_library_errors_do_not_name_command_line_flags(files) -> None:
    with pytest.raises(InputSpecError) as caught:
        diagnose(files["mixed"])
    assert "--input-shape" not in str(caught.value)
    # the example fits each input: an image batch for x, token ids for the integer input
    assert "DiagnoseOptions(input_shapes=[[8, 3, 224, 224], [8, 128]])" in str(caught.value)


def test_folder_of_torchscript_files_without_shapes_points_at_the_config(files, tmp_path,
                                                                        capsys) -> None:
    folder = tmp_path / "ts"
    folder.mkdir()
    for name in ("a.pt", "b.pt"):
        (folder / name).write_bytes(files["mixed"].read_bytes())
    assert main(["lint", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("no declared shape") == 2 and "--input-shape 8x3x224x224 --input-shape 8x128" in err
    assert "[tool.gradprobe.input-shapes]" in err


def test_a_file_fixed_at_batch_one_says_what_that_costs(tmp_path) -> None:
    path = tmp_path / "batch1.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(),
                          (torch.randn(1, 8),), str(path), dynamo=False)
    report = diagnose(path, DiagnoseOptions(device="cpu"))
    assert report.model.inputs[0].shape == [1, 8]
    assert any("fixes the batch size at 1" in note and "dynamic" in note
               for note in report.model.notes)


def test_a_graph_that_fails_at_its_own_declared_shape_says_so(tmp_path) -> None:
    # The legacy exporter can write a graph that fails at every batch size (cohere2's
    # interleaved rotary embedding): the probe batch fits the declaration, so the message says
    # the fault is the file's, not the shape's.
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    wrong = numpy_helper.from_array(np.ones((5,), np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Mul", ["h", "scale"], ["y"])],  # (batch, 3) * (5,): never fits
        "broken", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, wrong])
    path = tmp_path / "broken.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                     .SerializeToString())
    with pytest.raises(InputSpecError, match=r"the file declares x batchx4, and the probe batch "
                                             r"fits that: the graph fails at its own shape"):
        diagnose(path, DiagnoseOptions(device="cpu"))
    # a shape that does not fit the declaration keeps the plain message
    with pytest.raises(InputSpecError) as err:
        diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[2, 5]]))
    assert "fits that" not in str(err.value)
