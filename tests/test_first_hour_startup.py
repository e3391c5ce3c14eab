"""Issue 13, start-up: commands that do not probe never import torch (nor grpc), and the rule
list they print is the rules' own documentation, with every verdict a rule can give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_rule_catalog  # noqa: E402

HEAVY = ("torch", "grpc", "onnx", "numpy")


@pytest.mark.parametrize("argv", [["--version"], ["rules"], ["rule", "dead-relu"],
                                  ["lint", "--help"], ["fix", "--help"]])
def test_light_commands_do_not_import_torch(argv) -> None:
    probe = ("import sys, contextlib, io\n"
             "from gradprobe.client.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             f"    code = main({argv!r})\n"
             f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split(maxsplit=1)
    assert out[0] == "0" and out[1].strip() == "[]", out


def test_rule_catalog_is_fresh() -> None:
    """The data `gradprobe rules` prints is what the rule modules say (make rule-catalog)."""
    assert (ROOT / "diagnostics" / "_rule_catalog_data.py").read_text() == \
        gen_rule_catalog.render()


def test_rules_column_shows_the_verdict_a_user_meets(tmp_path, capsys) -> None:
    """dead-relu with 88% of a layer dead is a warning (error from 90%): the list says so."""
    from gradprobe.client.cli import main
    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.options import DiagnoseOptions

    net = nn.Sequential(nn.Linear(32, 100), nn.ReLU(), nn.Linear(100, 10))
    nn.init.kaiming_normal_(net[0].weight)
    with torch.no_grad():
        net[0].bias.zero_()
        net[0].bias[:88] = -6.0  # 88 of 100 units can never fire (pre-activation std ~1.4)
    path = tmp_path / "dead88.pt"
    torch.jit.trace(net, (torch.randn(8, 32),)).save(str(path))
    report = diagnose(path, DiagnoseOptions(input_shapes=[[8, 32]], device="cpu"))
    dead = [f for f in report.findings if f.rule == "dead-relu"]
    assert [f.severity.value for f in dead] == ["warning"]

    assert main(["rules"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("dead-relu "))
    assert "warning" in row.split()[1] and "error" in row.split()[1]
