"""The CI side of the CLI end to end, on real exported models: folders of models, every CI
format through --output, configuration files, baselines, the HTML page, and the integration
examples shipped in the repository."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from defects import dead_relu, healthy_mlp, zero_hidden
from zoo import export_onnx, export_torchscript

from gradprobe.client.cli import build_parser, main
from gradprobe.client.discover import ONNX_SUFFIXES, TORCHSCRIPT_SUFFIXES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    """A small model zoo: a healthy and a broken ONNX model, a broken TorchScript model (no
    shapes: the config supplies them), and a checkpoint that is not a model."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "onnx").mkdir()
    (root / "ts").mkdir()
    model, args = healthy_mlp()
    export_onnx(model, args, root / "onnx" / "healthy.onnx")
    model, args = zero_hidden()
    export_onnx(model, args, root / "onnx" / "zero.onnx")
    model, args = dead_relu()
    export_torchscript(model, args, root / "ts" / "dead.pt")
    torch.save(model.state_dict(), root / "ts" / "weights.pt")
    (root / "gradprobe.toml").write_text('device = "cpu"\n[input-shapes]\n"ts/*.pt" = [[8, 32]]\n')
    return root


@pytest.fixture
def in_zoo(zoo_dir, monkeypatch, tmp_path) -> Path:
    """Run from inside a copy of the zoo, as CI runs from the checkout root."""
    work = tmp_path / "repo"
    shutil.copytree(zoo_dir, work)
    monkeypatch.chdir(work)
    return work


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_folder_to_sarif_file(capsys, in_zoo):
    code, out, err = run(capsys, "lint", ".", "--jobs", "1", "--format", "sarif",
                         "--output", "gradprobe.sarif")
    assert code == 1, err  # zero weights are an error
    assert out == "" and "\r" not in err  # report went to the file; no progress off a TTY
    log = json.loads((in_zoo / "gradprobe.sarif").read_text())
    run_ = log["runs"][0]
    assert [a["location"]["uri"] for a in run_["artifacts"]] == [
        "onnx/healthy.onnx", "onnx/zero.onnx", "ts/dead.pt"]  # the checkpoint was skipped
    by_file = {}
    for result in run_["results"]:
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        by_file.setdefault(uri, set()).add(result["ruleId"])
        rule = run_["tool"]["driver"]["rules"][result["ruleIndex"]]
        assert rule["id"] == result["ruleId"]
    assert "zero-weights" in by_file["onnx/zero.onnx"]
    assert "dead-relu" in by_file["ts/dead.pt"]
    assert "onnx/healthy.onnx" not in by_file


@pytest.mark.slow
def test_parallel_folder_same_as_serial(capsys, in_zoo):
    serial = run(capsys, "lint", ".", "--jobs", "1", "--format", "gitlab")
    parallel = run(capsys, "lint", ".", "--jobs", "2", "--format", "gitlab")
    assert serial[0] == parallel[0] == 1
    assert json.loads(serial[1]) == json.loads(parallel[1])


@pytest.mark.parametrize("fmt", ["junit", "github", "gitlab"])
def test_other_ci_formats_parse(capsys, in_zoo, fmt):
    code, out, err = run(capsys, "lint", "onnx", "--format", fmt, "--fail-on", "warning")
    assert code == 1, err
    if fmt == "junit":
        root = ET.fromstring(out)
        suites = {s.get("name"): s for s in root.iter("testsuite")}
        assert set(suites) == {"onnx/healthy.onnx", "onnx/zero.onnx"}
        assert int(suites["onnx/zero.onnx"].get("failures")) >= 1
        assert suites["onnx/healthy.onnx"].get("failures") == "0"
    elif fmt == "github":
        lines = [l for l in out.splitlines() if l.startswith("::")]
        assert lines and all(re.match(r"::(error|warning|notice) file=onnx/zero\.onnx,title=", l)
                             for l in lines)
    else:
        issues = json.loads(out)
        assert {i["location"]["path"] for i in issues} == {"onnx/zero.onnx"}
        assert "zero-weights" in {i["check_name"] for i in issues}


def test_configuration_file_and_flag_override(capsys, in_zoo):
    (in_zoo / "gradprobe.toml").write_text(
        'device = "cpu"\nfail-on = "never"\nformat = "json"\n'
        '[input-shapes]\n"ts/*.pt" = [[8, 32]]\n')
    code, out, _ = run(capsys, "lint", "ts/dead.pt")
    assert code == 0  # fail-on = never from the file
    report = json.loads(out)  # format = json from the file
    assert report["model"]["inputs"][0]["shape"] == [8, 32]
    assert run(capsys, "lint", "ts/dead.pt", "--fail-on", "error")[0] == 1  # the flag wins
    code, _, err = run(capsys, "lint", "ts/dead.pt", "--input-shape", "4x32",
                       "--format", "json", "--output", "r.json")
    assert json.loads((in_zoo / "r.json").read_text())["model"]["inputs"][0]["shape"] == [4, 32]

    (in_zoo / "pyproject.toml").write_text('[tool.gradprobe]\nfail_on = "never"\n')
    code, _, err = run(capsys, "lint", "ts/dead.pt", "--config", "pyproject.toml")
    assert code == 2
    assert err.strip() == ("gradprobe: error: pyproject.toml: [tool.gradprobe] unknown key "
                           "'fail_on' (did you mean 'fail-on'?); known keys: select, ignore, "
                           "severity, thresholds, input-shapes, input-dtype, batch-size, "
                           "fail-on, format, device, seed")


def test_baseline_adoption_flow(capsys, in_zoo):
    code, _, err = run(capsys, "lint", ".", "--write-baseline", "baseline.json")
    assert code == 0 and "recorded" in err
    entries = json.loads((in_zoo / "baseline.json").read_text())["entries"]
    assert {e["model"] for e in entries} == {"onnx/zero.onnx", "ts/dead.pt"}

    code, out, err = run(capsys, "lint", ".", "--baseline", "baseline.json", "--format", "json")
    assert code == 0, out
    assert "hidden by baseline" in err
    reports = json.loads(out)["reports"]
    assert len(reports) == 3 and all(r["findings"] == [] for r in reports)
    assert all(r["summary"] == {"error": 0, "warning": 0, "info": 0} for r in reports)

    # A new broken model joins the zoo: only it is reported.
    model, args = zero_hidden()
    export_onnx(model, args, in_zoo / "onnx" / "new.onnx")
    code, out, _ = run(capsys, "lint", ".", "--baseline", "baseline.json", "--format", "gitlab")
    assert code == 1
    issues = json.loads(out)
    assert {i["location"]["path"] for i in issues
            if i["check_name"] != "gradprobe/skipped"} == {"onnx/new.onnx"}
    # the state_dict beside the models is said to be skipped, not silently passed over
    assert {i["location"]["path"] for i in issues
            if i["check_name"] == "gradprobe/skipped"} == {"ts/weights.pt"}

    code, _, err = run(capsys, "lint", ".", "--baseline", "missing.json")
    assert code == 2 and "baseline file not found" in err


def test_bad_file_among_good_ones(capsys, in_zoo):
    (in_zoo / "onnx" / "broken.onnx").write_bytes(b"\x08\x07 not a model")
    code, out, err = run(capsys, "lint", "onnx", "--format", "gitlab")
    assert code == 2
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("gradprobe: error: onnx/broken.onnx: ")
    # the good files were still linted and reported, and the broken one is a blocker issue
    issues = json.loads(out)
    assert {i["location"]["path"] for i in issues
            if i["check_name"] != "gradprobe/load-error"} == {"onnx/zero.onnx"}
    assert [i["location"]["path"] for i in issues
            if i["check_name"] == "gradprobe/load-error"] == ["onnx/broken.onnx"]


def test_html_page(capsys, in_zoo):
    code, _, _ = run(capsys, "lint", "onnx", "--html", "report.html", "--output", "out.txt")
    assert code == 1
    page = (in_zoo / "report.html").read_text()
    assert page.count("<svg") == 4 and "onnx/zero.onnx" in page and "zero-weights" in page
    assert "<script" not in page


def test_empty_folder_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "lint", "empty")
    assert code == 2 and "no ONNX or TorchScript model files found" in err


# ---------------------------------------------------------------- shipped integrations

def commands_in(path: Path) -> list[list[str]]:
    lines = re.findall(r"(?:run:|- )\s*(gradprobe lint [^\n#]*)", path.read_text())
    return [shlex.split(line)[1:] for line in lines]


@pytest.mark.parametrize("example, fmt", [("examples/ci/github-actions.yml", "sarif"),
                                          ("examples/ci/gitlab-ci.yml", "gitlab")])
def test_ci_examples_run_valid_commands(example, fmt):
    commands = commands_in(REPO / example)
    assert commands
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert args.format == fmt and args.output is not None
    text = (REPO / example).read_text()
    if fmt == "sarif":
        assert "github/codeql-action/upload-sarif" in text and "security-events: write" in text
    else:
        assert "codequality:" in text


def test_pre_commit_hook_definition():
    text = (REPO / ".pre-commit-hooks.yaml").read_text()
    assert re.search(r"^- id: gradprobe$", text, re.M)
    assert re.search(r"^  entry: gradprobe lint$", text, re.M)
    pattern = re.search(r"^  files: (.+)$", text, re.M).group(1)
    for suffix in ONNX_SUFFIXES + tuple(s for s in TORCHSCRIPT_SUFFIXES if s != ".pth"):
        assert re.search(pattern, f"models/net{suffix}"), suffix
    # weights without a graph: .pth (torch.save's usual suffix), safetensors, external data
    for name in ("models/net.pth", "models/net.safetensors", "models/net.onnx.data"):
        assert not re.search(pattern, name), name
    assert build_parser().parse_args(["lint", "a.onnx", "b.pt"]).models == [Path("a.onnx"),
                                                                            Path("b.pt")]


def test_fix_writes_before_and_after_page(capsys, in_zoo):
    code, out, err = run(capsys, "fix", "onnx/zero.onnx", "-o", "fixed.onnx", "--device", "cpu",
                         "--html", "fix.html")
    assert code == 0, err
    page = (in_zoo / "fix.html").read_text()
    assert "gradprobe fix report" in page and "fixed from" in page
    # one legend line per plot explains the dashed "before" curves under the solid "after" ones
    assert page.count("dashed: before fix</text>") == 2
    assert page.count("(before fix)): ") > 0 and page.count("(after fix)): ") > 0
    assert "Resolved by the fix" in page and "zero-weights" in page
