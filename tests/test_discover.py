"""Model discovery under a directory, on real exported files."""

from __future__ import annotations

import zipfile

import pytest
import torch
from zoo import MLP, example_inputs, export_onnx, export_torchscript

from gradprobe.client.discover import expand_paths, find_models, is_torchscript_archive
from gradprobe.diagnostics.errors import ModelLoadError


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    (root / "vision" / "deep").mkdir(parents=True)
    (root / "text").mkdir()
    (root / ".git").mkdir()
    (root / "__pycache__").mkdir()
    model, args = MLP(), example_inputs("mlp")
    export_onnx(model, args, root / "vision" / "b.onnx")
    export_onnx(model, args, root / "vision" / "deep" / "big.onnx", dynamo=True)  # + .data file
    export_torchscript(model, args, root / "text" / "traced.pt")
    export_torchscript(model, args, root / "text" / "scripted.ts", scripted=True)
    export_torchscript(model, args, root / "a_model.pth")
    torch.save(model.state_dict(), root / "text" / "checkpoint.pt")  # weights, not a model
    torch.save(model.state_dict(), root / "text" / "weights.pth")
    (root / "text" / "notes.pt").write_text("not a zip")
    (root / "readme.md").write_text("# zoo")
    export_onnx(model, args, root / ".git" / "hidden.onnx")
    export_onnx(model, args, root / "__pycache__" / "cached.onnx")
    return root


def rel(root, paths):
    return [p.relative_to(root).as_posix() for p in paths]


def test_finds_models_sorted_and_skips_everything_else(tree):
    found = find_models(tree)
    assert rel(tree, found) == ["a_model.pth", "text/scripted.ts", "text/traced.pt",
                                "vision/b.onnx", "vision/deep/big.onnx"]
    # the dynamo export really wrote an external data file next to the model, and it was skipped
    assert any(p.name.endswith(".data") for p in (tree / "vision" / "deep").iterdir())


def test_deterministic(tree):
    assert find_models(tree) == find_models(tree)


def test_torchscript_sniffing(tree):
    assert is_torchscript_archive(tree / "text" / "traced.pt")
    assert is_torchscript_archive(tree / "text" / "scripted.ts")
    assert zipfile.is_zipfile(tree / "text" / "checkpoint.pt")  # a zip with data.pkl ...
    assert not is_torchscript_archive(tree / "text" / "checkpoint.pt")  # ... but no code
    assert not is_torchscript_archive(tree / "text" / "notes.pt")
    assert not is_torchscript_archive(tree / "missing.pt")


def test_expand_paths_mixes_files_and_directories(tree):
    explicit = tree / "text" / "checkpoint.pt"  # named explicitly: the loader will judge it
    paths = expand_paths([explicit, tree / "vision", tree / "vision" / "b.onnx"])
    assert rel(tree, paths) == ["text/checkpoint.pt", "vision/b.onnx", "vision/deep/big.onnx"]


def test_directory_without_models_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no ONNX or TorchScript model files found"):
        expand_paths([tmp_path / "empty"])
