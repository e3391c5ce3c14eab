"""Issue 13, service and CI: the client and the CLI take the token from the environment or a
file (never only from argv), the pre-commit hook runs for real through `pre-commit try-repo`
and matches only files it can lint, and the CI examples install what exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from defects import healthy_mlp, zero_hidden
from server_harness import start_test_server
from zoo import export_onnx

from gradprobe.client.api import Client, RemoteError
from gradprobe.client.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "first-hour-token"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory):
    running = start_test_server(tmp_path_factory.mktemp("token-server"), token=TOKEN)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net, args = healthy_mlp()
    return export_onnx(net, args, tmp_path_factory.mktemp("svc") / "healthy.onnx")


@pytest.mark.slow
def test_client_reads_gradprobe_token(token_server, monkeypatch) -> None:
    monkeypatch.delenv("GRADPROBE_TOKEN", raising=False)
    with Client(token_server.address, timeout_s=30) as client, \
            pytest.raises(RemoteError) as refused:
        client.server_info()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "GRADPROBE_TOKEN" in str(refused.value) and "--token-file" in str(refused.value)
    monkeypatch.setenv("GRADPROBE_TOKEN", TOKEN)
    with Client(token_server.address, timeout_s=30) as client:
        assert client.server_info().auth_required


@pytest.mark.slow
def test_cli_token_file(token_server, model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("GRADPROBE_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    argv = ["lint", str(model), "--server", token_server.address, "--timeout", "120"]
    assert main([*argv, "--token-file", str(token_file)]) == 0
    assert main(argv) == 2  # no token anywhere: refused, one line
    assert "GRADPROBE_TOKEN" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main([*argv, "--token-file", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err


def _hooks() -> dict[str, dict]:
    return {hook["id"]: hook for hook in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml")
                                                        .read_text())}


@pytest.mark.parametrize("name", ["model.onnx", "enc.pt", "m.ts", "m.torchscript", "m.ptl"])
def test_hook_matches_lintable_files(name) -> None:
    for hook in _hooks().values():
        assert re.search(hook["files"], name), (hook["id"], name)


@pytest.mark.parametrize("name", ["weights.pth", "model.safetensors", "model.onnx.data",
                                  "pytorch_model.bin", "notes.txt"])
def test_hook_leaves_weights_only_files_alone(name) -> None:
    for hook in _hooks().values():
        assert not re.search(hook["files"], name), (hook["id"], name)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_pre_commit_try_repo_runs_the_hook(tmp_path) -> None:
    """The hook as a user runs it: pre-commit reads this repository's .pre-commit-hooks.yaml
    and runs `gradprobe lint` on the staged model files (the installed gradprobe: offline)."""
    pytest.importorskip("pre_commit")
    # A copy of this tree in a repository of its own. Never the tree's own .git: in a git
    # worktree it is a file pointing at the real repository, and committing through it would
    # commit into the developer's branch.
    hook_repo = tmp_path / "gradprobe"
    shutil.copytree(ROOT, hook_repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "build"), symlinks=True)
    _git(hook_repo, "init", "-q")
    _git(hook_repo, "add", "-A")
    _git(hook_repo, "commit", "-q", "--allow-empty", "-m", "hooks under test")

    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q")
    net, args = zero_hidden()
    export_onnx(net, args, project / "broken.onnx")
    (project / "weights.pth").write_bytes(b"\x80\x02}q\x00.")  # weights only: not the hook's
    _git(project, "add", "-A")

    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "pre_commit", "try-repo", str(hook_repo),
                          "gradprobe-system", "--all-files", "--verbose"],
                         cwd=project, capture_output=True, text=True, env=env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output  # the planted zero layer fails the commit
    assert "zero-weights" in output and "broken.onnx" in output
    assert "weights.pth" not in output  # the hook's files: pattern left it out

    (project / "broken.onnx").unlink()
    net, args = healthy_mlp()
    export_onnx(net, args, project / "good.onnx")
    _git(project, "add", "-A")
    run = subprocess.run([sys.executable, "-m", "pre_commit", "try-repo", str(hook_repo),
                          "gradprobe-system", "--all-files"],
                         cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("path", ["examples/ci/github-actions.yml", "examples/ci/gitlab-ci.yml",
                                  "docs/integrations.md", "README.md"])
def test_ci_examples_install_what_exists(path) -> None:
    """No `pip install gradprobe` (not on any index); torch's CPU build is named for CPU
    runners; the git form is pip's direct reference."""
    text = (ROOT / path).read_text()
    assert not re.search(r"pip install gradprobe\b(?!-)", text), path
    if path.startswith("examples/"):
        yaml.safe_load(text)  # valid YAML
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
        assert re.search(r'"gradprobe @ git\+https://[^"@]+@v\d+\.\d+\.\d+"', text)


@pytest.mark.slow
def test_remote_lint_keeps_a_files_fixed_batch(token_server, tmp_path) -> None:
    """The wire carries a batch size only when the caller chose one: a file fixed at batch 4
    lints remotely as it does locally, and a folder's shapes only fill what files leave open."""
    import warnings

    import torch
    from torch import nn

    from gradprobe.diagnostics.errors import InputSpecError
    from gradprobe.diagnostics.options import DiagnoseOptions

    path = tmp_path / "fixed4.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(),
                          (torch.randn(4, 8),), str(path), dynamo=False)
    with Client(token_server.address, token=TOKEN, timeout_s=120) as client:
        assert client.diagnose(path).model.inputs[0].shape == [4, 8]
        with pytest.raises(InputSpecError, match="fixed batch size of 4"):
            client.diagnose(path, DiagnoseOptions(batch_size=2))
        filled = DiagnoseOptions(input_shapes=[[2, 8]], fill_undeclared=True)
        assert client.diagnose(path, filled).model.inputs[0].shape == [4, 8]
