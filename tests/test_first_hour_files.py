"""Issue 13, files: what is not a model is recognised and said once; a folder says what it
skipped, and a file that failed appears in every CI format as that format expects."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from defects import healthy_mlp
from safetensors.torch import save_file
from zoo import export_onnx

from gradprobe.client.cli import main
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.errors import ModelLoadError

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1234\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("first_hour_files") / "models"
    root.mkdir()
    model, args = healthy_mlp()
    export_onnx(model, args, root / "good.onnx")
    (root / "broken.onnx").write_bytes(b"this is not a model\n")
    torch.save(model.state_dict(), root / "weights.pth")  # zip, no TorchScript code
    torch.save(model.state_dict(), root / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "weights.safetensors"))
    return root


@pytest.mark.parametrize(("name", "needle"), [
    ("weights.pth", "weights-only PyTorch checkpoint"),
    ("legacy.pt", "pickled PyTorch checkpoint"),
    ("weights.safetensors", "safetensors file: weights only"),
])
def test_weights_only_files_say_what_they_are_and_what_to_do(folder, name, needle) -> None:
    with pytest.raises(ModelLoadError, match=needle) as caught:
        diagnose(folder / name)
    assert "lint the exported model" in str(caught.value)
    assert "gradprobe.diagnose(model, inputs)" in str(caught.value)


def test_git_lfs_pointer_says_run_git_lfs_pull(tmp_path, capsys) -> None:
    pointer = tmp_path / "model.onnx"
    pointer.write_bytes(LFS)
    assert main(["lint", str(pointer)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count(str(pointer)) == 1, captured.err  # the path once, not twice
    assert "git-lfs pointer" in captured.err and "git lfs pull" in captured.err
    assert captured.out == ""  # no stray blank line when nothing was linted


def test_onnx_external_data_file_points_at_the_model(tmp_path) -> None:
    model, args = healthy_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, str(tmp_path / "m.onnx"), dynamo=False,
                          external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(b"\0" * 64)  # what an external-data file holds: raw tensor bytes
    with pytest.raises(ModelLoadError, match="external-data file of an ONNX model.*lint the "
                                             r"\.onnx file"):
        diagnose(data)


def test_path_is_printed_once(folder, capsys) -> None:
    assert main(["lint", str(folder / "weights.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("weights.pth") == 1, err


def _lint(folder: Path, fmt: str, capsys) -> tuple[int, str]:
    code = main(["lint", str(folder), "--format", fmt, "--device", "cpu"])
    return code, capsys.readouterr().out


def test_folder_text_says_what_it_skipped(folder, capsys) -> None:
    code, out = _lint(folder, "text", capsys)
    assert code == 2  # broken.onnx
    assert ("skipped 3 files (2 weights-only checkpoint, 1 safetensors weights)") in out
    assert "weights.safetensors" in out


def test_folder_json_lists_errors_and_skipped(folder, capsys) -> None:
    _, out = _lint(folder, "json", capsys)
    doc = json.loads(out)
    assert doc["schema"] == "gradprobe.reports/v1"
    assert [Path(r["model"]["path"]).name for r in doc["reports"]] == ["good.onnx"]
    assert [Path(e["path"]).name for e in doc["errors"]] == ["broken.onnx"]
    assert sorted(Path(s["path"]).name for s in doc["skipped"]) == [
        "legacy.pt", "weights.pth", "weights.safetensors"]


def test_sarif_marks_the_run_unsuccessful_with_a_notification(folder, capsys) -> None:
    _, out = _lint(folder, "sarif", capsys)
    invocation = json.loads(out)["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False
    notes = invocation["toolExecutionNotifications"]
    errors = [n for n in notes if n["level"] == "error"]
    assert len(errors) == 1 and "broken.onnx" in errors[0]["message"]["text"]
    assert errors[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "broken.onnx")
    assert sum(n["level"] == "note" for n in notes) == 3  # the skipped files


def test_sarif_of_a_clean_run_stays_successful(folder, capsys) -> None:
    assert main(["lint", str(folder / "good.onnx"), "--format", "sarif"]) == 0
    invocation = json.loads(capsys.readouterr().out)["runs"][0]["invocations"][0]
    assert invocation == {"executionSuccessful": True}


def test_junit_has_an_error_for_the_broken_file(folder, capsys) -> None:
    _, out = _lint(folder, "junit", capsys)
    root = ET.fromstring(out)
    assert root.get("errors") == "1" and root.get("skipped") == "3"
    errors = root.findall(".//testcase/error")
    assert len(errors) == 1 and "not an ONNX model" in errors[0].get("message")
    assert len(root.findall(".//testcase/skipped")) == 3


def test_github_annotates_the_broken_file(folder, capsys) -> None:
    _, out = _lint(folder, "github", capsys)
    errors = [line for line in out.splitlines() if line.startswith("::error ")]
    assert len(errors) == 1 and "broken.onnx" in errors[0]
    assert sum(line.startswith("::notice ") for line in out.splitlines()) == 3
    assert "1 file(s) could not be linted" in out.splitlines()[-1]


def test_gitlab_has_a_blocker_issue_for_the_broken_file(folder, capsys) -> None:
    _, out = _lint(folder, "gitlab", capsys)
    issues = json.loads(out)
    blockers = [i for i in issues if i["check_name"] == "gradprobe/load-error"]
    assert len(blockers) == 1 and blockers[0]["severity"] == "blocker"
    assert blockers[0]["location"]["path"].endswith("broken.onnx")
    assert len({i["fingerprint"] for i in issues}) == len(issues)


def test_torchscript_model_in_a_folder_is_still_linted(tmp_path, capsys) -> None:
    model, args = healthy_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, args).save(str(tmp_path / "traced.pt"))
    (tmp_path / "head.pth").write_bytes(b"\x80\x02}q\x00.")  # a tiny pickle
    assert main(["lint", str(tmp_path), "--input-shape", "8x32", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [Path(r["model"]["path"]).name for r in doc["reports"]] == ["traced.pt"]
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["head.pth"]


