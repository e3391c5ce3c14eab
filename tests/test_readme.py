"""Every command in the README runs as written (placeholders `model.onnx`, `model.pt`,
`enc.pt`, `models/` are models this test builds), and what the README says they print is what
they print."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from defects import healthy_mlp
from torch import nn
from zoo import export_onnx

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    """The gradprobe command lines of the README's shell blocks, comments dropped; the service
    ones need a server (tests/test_server_* run it) and are left out here."""
    found = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"^(\.venv/bin/)?gradprobe ", line) and "serve" not in line \
                    and "--server" not in line:
                found.append(line)
    return found


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.emb(ids))).mean(1)


class TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    model, args = healthy_mlp()
    export_onnx(model, args, root / "model.onnx")
    (root / "models").mkdir()
    export_onnx(model, args, root / "models" / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(TinyCnn(), (torch.randn(2, 3, 224, 224),)).save(str(root / "model.pt"))
        torch.jit.trace(Encoder(), (torch.zeros(4, 32, dtype=torch.long),)).save(
            str(root / "enc.pt"))
    (root / ".venv").symlink_to(BIN.parent)  # the README's `.venv/bin/gradprobe`
    return root


def run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    argv[0] = str(BIN / "gradprobe")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_readme_has_the_commands_this_test_runs() -> None:
    lines = commands()
    assert any(line.endswith("gradprobe rules") or "gradprobe rules " in line for line in lines)
    assert any("--format sarif" in line for line in lines)
    assert len(lines) >= 12


@pytest.mark.slow
@pytest.mark.parametrize("line", commands())
def test_readme_command_runs(line, workdir) -> None:
    result = run(line, workdir)
    if "--baseline baseline.json" in line and not (workdir / "baseline.json").exists():
        run(line.replace("--baseline", "--write-baseline"), workdir)
        result = run(line, workdir)
    # 0 clean, 1 findings: both are a command that worked; 2/3 would be a broken README line
    assert result.returncode in (0, 1), (line, result.stderr[-1500:])
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_readme_python_runs(workdir, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    library = next(block for block in blocks("python") if "gradprobe.diagnose" in block)
    exec(compile(library, "README.md", "exec"), {})
    assert capsys.readouterr() is not None


@pytest.mark.slow
def test_make_demo_prints_what_the_readme_says(workdir) -> None:
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    command = recipe.replace("$(BIN)/", "").split("||")[0].strip()
    result = run(command, ROOT)
    assert result.returncode == 1  # findings: the recipe accepts exactly this code
    assert "1 error(s), 1 warning(s), 0 info" in result.stdout
    assert "prints one\nerror" in README or "prints one error" in README
    assert re.search(r"^error\s+zero-weights\s+net\.6$", result.stdout, re.M)
    assert re.search(r"^warning dead-relu\s+net\.3$", result.stdout, re.M)


def test_readme_rule_table_lists_every_rule() -> None:
    from gradprobe.diagnostics.rule_catalog import rule_rows

    table = {name for row in re.findall(r"^\| ([a-z/ -]+) \|", README, re.M)
             for name in row.split(" / ")}
    assert {name for name, _, _ in rule_rows()} <= table | {"rule"}
