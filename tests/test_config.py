"""Configuration files: discovery, every key reaching the diagnosis options, and one-line errors
that name the file, the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_reports import rule_catalogue

from gradprobe.client.config import LintConfig, glob_matches, load_config
from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.report import Severity


@pytest.fixture
def catalogue():
    return rule_catalogue()


@pytest.fixture
def rule_with_threshold(catalogue):
    doc = next(d for d in catalogue if d.defaults)
    return doc.name, sorted(doc.defaults)[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_pyproject_table_reaches_options(tmp_path, rule_with_threshold):
    rule, threshold = rule_with_threshold
    write(tmp_path / "pyproject.toml", f"""
[project]
name = "zoo"

[tool.gradprobe]
select = ["{rule}", "zero-weights"]
ignore = ["vanishing-activations"]
fail-on = "warning"
input-dtype = "float32"
batch-size = 4
seed = 7
device = "cpu"
format = "sarif"

[tool.gradprobe.severity]
zero-weights = "warning"

[tool.gradprobe.thresholds.{rule}]
{threshold} = 0.25

[tool.gradprobe.input-shapes]
"vision/**/*.pt" = [[2, 3, 32, 32]]
"*.ts" = [1, 16]
"text/*.onnx" = [[2, 12], [2, 12]]
""")
    config = load_config(None, tmp_path / "models" / "deep")
    assert config.source == tmp_path / "pyproject.toml"
    assert config.fail_on == "warning" and config.format == "sarif"

    options = config.options_for(tmp_path / "vision" / "a" / "b" / "net.pt")
    assert options.input_shapes == [[2, 3, 32, 32]]
    assert options.select == [rule, "zero-weights"]
    assert options.ignore == ["vanishing-activations"]
    assert options.severities == {"zero-weights": Severity.WARNING}
    assert options.thresholds == {rule: {threshold: 0.25}}
    assert options.input_dtypes == ["float32"]
    assert (options.batch_size, options.seed, options.device) == (4, 7, "cpu")

    assert config.options_for(tmp_path / "deep" / "x" / "enc.ts").input_shapes == [[1, 16]]
    assert config.options_for(tmp_path / "text" / "bert.onnx").input_shapes == [[2, 12], [2, 12]]
    assert config.options_for(tmp_path / "other" / "bert.onnx").input_shapes is None


def test_gradprobe_toml_wins_over_pyproject_in_same_dir(tmp_path):
    write(tmp_path / "pyproject.toml", '[tool.gradprobe]\nfail-on = "info"\n')
    write(tmp_path / "gradprobe.toml", 'fail-on = "never"\n')
    assert load_config(None, tmp_path).fail_on == "never"


def test_search_skips_pyproject_without_table_and_stops_at_nearest(tmp_path):
    write(tmp_path / "pyproject.toml", '[tool.gradprobe]\nfail-on = "info"\n')
    write(tmp_path / "pkg" / "pyproject.toml", '[project]\nname = "pkg"\n')
    write(tmp_path / "pkg" / "sub" / "gradprobe.toml", 'seed = 3\n')
    assert load_config(None, tmp_path / "pkg").fail_on == "info"
    nearest = load_config(None, tmp_path / "pkg" / "sub" / "deeper")
    assert nearest.seed == 3 and nearest.fail_on == "error"


def test_no_file_gives_defaults(tmp_path):
    config = load_config(None, tmp_path)
    assert config.source is None and config.fail_on == "error"
    options = config.options_for(tmp_path / "m.onnx")
    assert options.select is None and options.ignore == [] and options.seed == 0


def test_explicit_config_file(tmp_path):
    custom = write(tmp_path / "ci" / "lint.toml", 'fail-on = "warning"\n'
                   '[input-shapes]\n"*.pt" = [[1, 8]]\n')
    config = load_config(custom, tmp_path / "elsewhere")
    assert config.fail_on == "warning"
    # Globs are relative to the file's directory, but a bare name matches anywhere.
    assert config.options_for(tmp_path / "zoo" / "m.pt").input_shapes == [[1, 8]]
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", tmp_path)
    bare = write(tmp_path / "other" / "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"pyproject.toml: has no \[tool.gradprobe\] table"):
        load_config(bare, tmp_path)


@pytest.mark.parametrize("body, problem", [
    ('fail_on = "warning"', r"unknown key 'fail_on' \(did you mean 'fail-on'\?\)"),
    ('colour = true', r"unknown key 'colour'; known keys: select, ignore"),
    ('fail-on = "fatal"', r"key 'fail-on': must be 'error', 'warning', 'info' or 'never'"),
    ('select = ["dead-reluu"]', r"key 'select': unknown rule 'dead-reluu' \(did you mean 'dead-relu'\?\)"),
    ('ignore = ["nope"]', r"key 'ignore': unknown rule 'nope'"),
    ('[severity]\ndead-relu = "fatal"', r"key 'severity.dead-relu': must be"),
    ('[severity]\nmystery = "error"', r"key 'severity': unknown rule 'mystery'"),
    ('[thresholds.dead-relu]\nno_such = 1', r"key 'thresholds.dead-relu': rule dead-relu has no threshold 'no_such'"),
    ('[thresholds.dead-relu]\nshare = "0.5"', r"key 'thresholds.dead-relu.share': must be a valid number"),
    ('[input-shapes]\n"*.pt" = [[1, 0]]', r"key 'input-shapes': .*each >= 1"),
    ('[input-shapes]\n"*.pt" = [[1, "3"]]', r"key 'input-shapes.\*.pt': must be a valid integer"),
    ('input-dtype = "float8"', r"key 'input-dtype': must be"),
    ('seed = true', r"key 'seed': must be a valid integer"),
    ('format = "xml"', r"key 'format': unknown format 'xml'"),
    ('fail-on = ', r"invalid TOML"),
])
def test_bad_configuration_is_one_clear_line(tmp_path, body, problem):
    path = write(tmp_path / "gradprobe.toml", body + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(None, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    assert __import__("re").search(problem, message), message


def test_pyproject_errors_name_the_table(tmp_path):
    path = write(tmp_path / "pyproject.toml", '[tool.gradprobe]\nfial-on = "x"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: \[tool.gradprobe\] unknown key 'fial-on' "
                                          r"\(did you mean 'fail-on'\?\)"):
        load_config(None, tmp_path)


def test_command_line_overrides_key_by_key(tmp_path):
    write(tmp_path / "gradprobe.toml", 'fail-on = "warning"\nseed = 3\nselect = ["dead-relu"]\n'
          '[input-shapes]\n"*.onnx" = [[1, 16]]\n')
    config = load_config(None, tmp_path).with_overrides(
        fail_on="info", forced_shapes=[[4, 32]], input_dtype="float64", seed=None)
    assert config.fail_on == "info"
    assert config.seed == 3  # not given on the command line: the file's value stays
    assert config.select == ["dead-relu"]
    options = config.options_for(tmp_path / "m.onnx")
    assert options.input_shapes == [[4, 32]] and options.input_dtypes == ["float64"]
    assert config.source == tmp_path / "gradprobe.toml"
    with pytest.raises(ConfigError, match="^command line: key 'select': unknown rule 'nah'"):
        config.with_overrides(select=["nah"])
    with pytest.raises(ConfigError, match="^command line: key 'fail-on'"):
        config.with_overrides(fail_on="always")


@pytest.mark.parametrize("glob, path, matches", [
    ("*.onnx", "a/b/m.onnx", True),
    ("m.onnx", "a/m.onnx", True),
    ("a/*.onnx", "a/m.onnx", True),
    ("a/*.onnx", "a/b/m.onnx", False),
    ("a/**/*.onnx", "a/m.onnx", True),
    ("a/**/*.onnx", "a/b/c/m.onnx", True),
    ("./a/m?.pt", "a/m1.pt", True),
    ("a/m[0-9].pt", "a/mx.pt", False),
    ("a/m[!0-9].pt", "a/mx.pt", True),
    ("b/*.onnx", "a/b/m.onnx", False),
])
def test_glob_matching(tmp_path, glob, path, matches):
    assert glob_matches(glob, tmp_path / path, tmp_path) is matches


def test_defaults_are_a_valid_config():
    assert LintConfig().options_for(Path("x.onnx")).batch_size == 8


def test_flags_given_on_the_command_line_become_overrides(tmp_path):
    import argparse

    from gradprobe.client.config import overrides_from_args

    args = argparse.Namespace(select=None, ignore=["init-scale"], fail_on=None, format="json",
                              input_shape=[[2, 16]], input_dtype=["int64"], batch_size=None,
                              device="cpu", seed=None, input_file="x.npy", model_format="onnx",
                              unrelated="kept out")
    overrides = overrides_from_args(args)
    assert overrides == {"ignore": ["init-scale"], "format": "json", "forced_shapes": [[2, 16]],
                         "input_dtype": ["int64"], "device": "cpu", "input_file": "x.npy",
                         "model_format": "onnx"}
    write(tmp_path / "gradprobe.toml", 'seed = 5\nignore = ["dead-relu"]\n')
    options = load_config(None, tmp_path).with_overrides(**overrides).options_for(
        tmp_path / "m.onnx")
    assert options.ignore == ["init-scale"] and options.seed == 5
    assert options.input_shapes == [[2, 16]] and options.input_dtypes == ["int64"]
    assert options.input_file == "x.npy" and options.format == "onnx"
