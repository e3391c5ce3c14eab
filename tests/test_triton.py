"""Triton model repositories: config.pbtxt written with Triton's own model-config schema
(tritonclient), ONNX and TorchScript versions, one result per model version."""

from __future__ import annotations

import json

import pytest
from defects import DEFECTS
from zoo import export_onnx, export_torchscript

from gradprobe.client.cli import main

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402


def _config(name: str, platform: str, max_batch: int, inputs: list[tuple[str, list[int]]]) -> str:
    config = model_config_pb2.ModelConfig(name=name, platform=platform, max_batch_size=max_batch)
    for input_name, dims in inputs:
        config.input.add(name=input_name, data_type=model_config_pb2.TYPE_FP32, dims=dims)
    config.output.add(name="output", data_type=model_config_pb2.TYPE_FP32, dims=[10])
    return text_format.MessageToString(config)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_repository")
    onnx_model = root / "classifier"
    for version, defect in (("1", "healthy_mlp"), ("2", "zero_hidden")):
        (onnx_model / version).mkdir(parents=True)
        model, x = DEFECTS[defect]()
        export_onnx(model, x, onnx_model / version / "model.onnx")
    (onnx_model / "config.pbtxt").write_text(
        _config("classifier", "onnxruntime_onnx", 4, [("input0", [32])]))
    ts_model = root / "scorer"
    (ts_model / "3").mkdir(parents=True)
    model, x = DEFECTS["dead_relu"]()
    export_torchscript(model, x, ts_model / "3" / "model.pt")
    (ts_model / "config.pbtxt").write_text(
        _config("scorer", "pytorch_libtorch", 0, [("INPUT__0", [2, 32])]))
    return root


def test_repository_lints_one_result_per_version_without_flags(repository, capsys):
    code = main(["lint", str(repository), "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    reports = out if isinstance(out, list) else out.get("reports", [out])
    assert code == 1 and len(reports) == 3
    by_version = {}
    for report in reports:
        note = next(n for n in report["model"]["notes"] if n.startswith("Triton model"))
        by_version[note.split(":")[0]] = report
    assert set(by_version) == {"Triton model 'classifier' version 1",
                               "Triton model 'classifier' version 2",
                               "Triton model 'scorer' version 3"}
    healthy = by_version["Triton model 'classifier' version 1"]
    planted = by_version["Triton model 'classifier' version 2"]
    scorer = by_version["Triton model 'scorer' version 3"]
    # max_batch_size 4 caps the probe batch (default 8); max_batch_size 0: dims are the shape
    assert healthy["model"]["inputs"][0]["shape"] == [4, 32]
    assert scorer["model"]["inputs"][0]["shape"] == [2, 32]
    assert not [f for f in healthy["findings"] if f["severity"] == "error"]
    assert ("zero-weights", "net.2") in {(f["rule"], f["layer"]) for f in planted["findings"]}
    assert ("dead-relu", "net.3") in {(f["rule"], f["layer"]) for f in scorer["findings"]}


def test_broken_config_is_one_clear_error(tmp_path, capsys):
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "broken"\nmax_batch_size: "eight"\n')
    assert main(["lint", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "config.pbtxt" in err and "Traceback" not in err
