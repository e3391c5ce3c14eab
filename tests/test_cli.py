"""The CLI as a user meets it: exit codes, one-line errors, the JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from defects import dead_relu, healthy_mlp, zero_hidden
from torch import nn
from zoo import export_onnx, export_torchscript

from gradprobe.client.cli import main

GRADPROBE = [sys.executable, "-m", "gradprobe"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    out: dict[str, Path] = {}
    for name, build in (("healthy", healthy_mlp), ("zero", zero_hidden), ("dead", dead_relu)):
        model, args = build()
        out[name] = export_onnx(model, args, root / f"{name}.onnx")
        out[name + "_ts"] = export_torchscript(model, args, root / f"{name}.pt")
    text = root / "notes.onnx"
    text.write_text("this is not a model\n")
    out["text"] = text
    whole = out["healthy"].read_bytes()
    truncated = root / "truncated.onnx"
    truncated.write_bytes(whole[: len(whole) // 2])
    out["truncated"] = truncated

    class Classify(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(x).argmax(-1)

    out["int_output"] = export_onnx(Classify(), (torch.randn(8, 32),), root / "argmax.onnx")
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gradprobe: error:")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_exit_codes_follow_fail_on(capsys, files):
    assert run(capsys, "lint", files["healthy"], "--device", "cpu")[0] == 0
    assert run(capsys, "lint", files["zero"], "--device", "cpu")[0] == 1
    assert run(capsys, "lint", files["zero"], "--fail-on", "never", "--device", "cpu")[0] == 0


def test_text_report_names_layer_rule_and_fix(capsys, files):
    code, out, _ = run(capsys, "lint", files["dead"], "--device", "cpu")
    assert code == 1
    assert "dead-relu" in out and "net.3" in out and "net.2" in out
    assert "nn.init.zeros_(model.net[2].bias)" in out
    assert "1 error(s)" in out


def test_json_report_contract(capsys, files):
    code, out, _ = run(capsys, "lint", files["zero_ts"], "--input-shape", "8x32",
                       "--format", "json", "--device", "cpu", "--seed", "5")
    assert code == 1
    report = json.loads(out)
    assert report["schema"] == "gradprobe.report/v1"
    assert report["seed"] == 5 and report["model"]["format"] == "torchscript"
    assert len(report["model"]["sha256"]) == 64
    assert report["model"]["inputs"] == [{"name": report["model"]["inputs"][0]["name"],
                                          "shape": [8, 32], "dtype": "float32", "source": "flag"}]
    finding = next(f for f in report["findings"] if f["rule"] == "zero-weights")
    assert set(finding) == {"rule", "severity", "layer", "nodes", "parameters", "message",
                            "evidence", "fix"}
    assert finding["layer"] == "net.2" and finding["parameters"] == ["net.2.weight"]
    fix = finding["fix"]
    assert fix["init"] == "he_normal" and fix["fan_in"] == 64 and fix["fan_out"] == 64
    assert fix["std"] == pytest.approx(0.1767767) and fix["bound"] == pytest.approx(0.3061862)
    assert "kaiming_normal_" in fix["code"]
    layer = report["layers"][0]
    assert {"name", "op", "activation", "gradient"} <= set(layer)
    assert {"grad_norm", "grad_to_weight", "zero_grad_fraction"} <= set(report["parameters"][0])
    assert set(report["timing"]) == {"load_s", "probe_s", "rules_s", "total_s"}


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "lint", tmp_path / "absent.onnx")
    assert code == 2
    one_line_error(err, "absent.onnx", "no such file")


def test_text_file_named_onnx(capsys, files):
    code, _, err = run(capsys, "lint", files["text"])
    assert code == 2
    one_line_error(err, "notes.onnx")


def test_truncated_onnx(capsys, files):
    code, _, err = run(capsys, "lint", files["truncated"])
    assert code == 2
    one_line_error(err, "truncated.onnx")


def test_torchscript_without_shape_names_the_flag(capsys, files):
    code, _, err = run(capsys, "lint", files["healthy_ts"], "--device", "cpu")
    assert code == 2
    one_line_error(err, "--input-shape")


def test_shape_of_wrong_rank(capsys, files):
    code, _, err = run(capsys, "lint", files["healthy"], "--input-shape", "8x3x32")
    assert code == 2
    one_line_error(err, "rank 2", "rank 3")


def test_shape_the_torchscript_graph_cannot_take(capsys, files):
    """TorchScript declares no shapes, so a wrong one surfaces inside the graph: still one line."""
    code, _, err = run(capsys, "lint", files["healthy_ts"], "--input-shape", "8x16",
                       "--device", "cpu")
    assert code == 2
    one_line_error(err, "rejected the shape of its inputs", "8x16 float32")


def test_integer_output_model(capsys, files):
    code, _, err = run(capsys, "lint", files["int_output"], "--device", "cpu")
    assert code == 2
    one_line_error(err, "int64", "floating-point output", "probe batch")


def test_bad_shape_and_dtype_flags(capsys, files):
    code, _, err = run(capsys, "lint", files["healthy"], "--input-shape", "8xbig")
    assert code == 2 and "8xbig" in err
    code, _, err = run(capsys, "lint", files["healthy"], "--input-dtype", "complex64")
    assert code == 2 and "complex64" in err


def test_unknown_rule_is_a_usage_error(capsys, files):
    code, _, err = run(capsys, "lint", files["zero"], "--select", "zero-weight")
    assert code == 2
    one_line_error(err, "zero-weight", "known rules")


def test_select_and_ignore(capsys, files):
    code, out, _ = run(capsys, "lint", files["zero"], "--ignore", "zero-weights", "--format", "json",
                       "--device", "cpu")
    assert "zero-weights" not in {f["rule"] for f in json.loads(out)["findings"]}
    code, out, _ = run(capsys, "lint", files["dead"], "--select", "dead-relu", "--format", "json",
                       "--device", "cpu")
    assert {f["rule"] for f in json.loads(out)["findings"]} == {"dead-relu"}


def test_rules_and_rule_docs(capsys):
    code, out, _ = run(capsys, "rules")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["nonfinite-weights", "nonfinite-values", "zero-weights", "constant-weights",
                     "init-scale", "vanishing-activations", "exploding-activations", "dead-relu",
                     "saturated-activation", "vanishing-gradients", "exploding-gradients",
                     "dead-gradients"]
    code, out, _ = run(capsys, "rule", "dead-relu")
    assert code == 0
    for section in ("Why it matters:", "Example:", "Fix:", "Thresholds:"):
        assert section in out
    code, _, err = run(capsys, "rule", "no-such-rule")
    assert code == 2 and "known rules" in err


def test_entry_point_without_traceback(files):
    """Through the real console entry, as a user types it."""
    proc = subprocess.run([*GRADPROBE, "lint", str(files["truncated"])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = subprocess.run([*GRADPROBE, "lint", str(files["healthy"]), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no findings" in proc.stdout


def test_unreachable_server_is_one_line_and_exit_2(capsys, files):
    code, _, err = run(capsys, "lint", files["healthy"], "--server", "127.0.0.1:1", "--timeout", "5")
    assert code == 2
    one_line_error(err, "UNAVAILABLE", "127.0.0.1:1")


def test_tls_cert_needs_its_key(capsys, files, tmp_path):
    code, _, err = run(capsys, "lint", files["healthy"], "--server", "127.0.0.1:1",
                       "--tls-cert", tmp_path / "c.pem")
    assert code == 2 and "--tls-key" in err
