"""Issue 13, the library's surface: what `import gradprobe` offers, Report.to_html(), the
documented multi-file schema, and errors worded for a library user."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from defects import healthy_mlp
from zoo import export_onnx

import gradprobe
from gradprobe.client.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_public_surface_is_exactly_all() -> None:
    assert sorted(dir(gradprobe)) == sorted(gradprobe.__all__)
    for leaked in ("Any", "TYPE_CHECKING", "annotations"):
        assert not hasattr(gradprobe, leaked), leaked
    for name in gradprobe.__all__:
        assert getattr(gradprobe, name) is not None


def test_diagnose_options_is_documented() -> None:
    doc = gradprobe.DiagnoseOptions.__doc__ or ""
    for field in ("input_shapes", "input_dtypes", "batch_size", "device", "select"):
        assert field in doc, field


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net, args = healthy_mlp()
    return export_onnx(net, args, tmp_path_factory.mktemp("api") / "mlp.onnx")


def test_report_to_html_is_a_self_contained_page(model) -> None:
    report = gradprobe.diagnose(model, gradprobe.DiagnoseOptions(device="cpu"))
    page = report.to_html()
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "mlp.onnx" in page and "<svg" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # opens offline


def test_multi_file_json_follows_the_documented_schema(model, tmp_path, capsys) -> None:
    doc_text = (ROOT / "docs" / "report-schema.md").read_text()
    second = tmp_path / "second.onnx"
    second.write_bytes(model.read_bytes())
    assert main(["lint", str(model), str(second), "--format", "json", "--device", "cpu"]) == 0
    envelope = json.loads(capsys.readouterr().out)
    assert envelope["schema"] == "gradprobe.reports/v1" and "`gradprobe.reports/v1`" in doc_text
    for key in envelope:  # every top-level field is documented in the table
        assert f"| `{key}` |" in doc_text, key
    for key in envelope["reports"][0]:
        assert f"`{key}`" in doc_text, key
