"""`gradprobe fix` on real exported models: the flagged tensors are re-initialised, nothing else
moves, deliberate zeros stay zero, and the fixed file probes clean.

Each case runs the CLI in-process (`main(argv)`), then loads both files with the engine's own
loaders and compares every parameter, and diagnoses the written copy independently.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from defects import DEFECTS
from zoo import build, example_inputs, export_onnx, export_torchscript

from gradprobe.client.cli import main
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.init_values import orthogonal
from gradprobe.diagnostics.loaders import load_model, sniff_format
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """exported(name, fmt) -> (path, input shapes): a defect (or zoo model) written once."""
    root = tmp_path_factory.mktemp("fix")
    cache: dict[tuple[str, str], tuple[Path, list[list[int]]]] = {}

    def get(name: str, fmt: str) -> tuple[Path, list[list[int]]]:
        if (name, fmt) not in cache:
            if name in DEFECTS:
                model, args = DEFECTS[name]()
            else:
                model, args = build(name), example_inputs(name)
            path = root / f"{name}{SUFFIX[fmt]}"
            (export_onnx if fmt == "onnx" else export_torchscript)(model, args, path)
            cache[(name, fmt)] = (path, [list(a.shape) for a in args])
        return cache[(name, fmt)]

    return get


def shape_flags(fmt: str, shapes: list[list[int]]) -> list[str]:
    """TorchScript files carry no input shapes; ONNX files declare theirs."""
    if fmt == "onnx":
        return []
    return [flag for s in shapes for flag in ("--input-shape", "x".join(map(str, s)))]


def run_fix(src: Path, out: Path, fmt: str, shapes: list[list[int]], *extra: str) -> int:
    return main(["fix", str(src), "-o", str(out), "--device", "cpu",
                 *shape_flags(fmt, shapes), *extra])


def probe_options(fmt: str, shapes: list[list[int]]) -> DiagnoseOptions:
    return DiagnoseOptions(device="cpu", input_shapes=shapes if fmt == "torchscript" else None)


def params(path: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_model(path).parameters.items()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def changed_names(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after), "the fixed file must keep every parameter under its name"
    return {n for n in before if not same_bytes(before[n], after[n])}


def errors(report: Report) -> list[str]:
    return [f"{f.rule}@{f.layer}" for f in report.findings if f.severity.value == "error"]


def fired(report: Report, rule: str) -> list:
    return [f for f in report.findings if f.rule == rule and f.severity.value != "info"]


def mlp_weights(*indices: int) -> set[str]:
    return {f"net.{i}.weight" for i in indices}


# defect -> (tensors whose values must change, rules that must no longer fire). None: every
# parameter (the chains' trend findings re-initialise all 40 layers).
WEIGHT_DEFECTS = {
    "zero_hidden": (mlp_weights(2), ["zero-weights"]),
    # net.0 is the constant error; net.2 is a constant matrix too (a rank-1 start, a warning
    # even though its units get distinct gradients); the dead-relu warning at net.5 re-draws
    # net.4 (its bias was already zero).
    "constant_hidden": (mlp_weights(0, 2, 4), ["constant-weights", "dead-relu"]),
    "nan_weight": (mlp_weights(2), ["nonfinite-weights"]),
    "large_init": (mlp_weights(2), ["init-scale"]),
    "dead_relu": ({"net.2.weight", "net.2.bias"}, ["dead-relu"]),
    # the three saturated layers, and the head's 8x-Xavier init (init-scale)
    "saturated_tanh": (mlp_weights(0, 2, 4, 6), ["saturated-activation", "init-scale"]),
    "chain_1.5": (None, ["exploding-activations", "exploding-gradients"]),
    "chain_0.5": (None, ["vanishing-activations", "vanishing-gradients"]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("defect", sorted(WEIGHT_DEFECTS))
def test_fix_reinitialises_exactly_the_flagged_tensors(exported, tmp_path, defect, fmt):
    src, shapes = exported(defect, fmt)
    out = tmp_path / f"fixed{SUFFIX[fmt]}"
    assert run_fix(src, out, fmt, shapes) == 0

    assert sniff_format(out.read_bytes()[:8]) == fmt
    assert load_model(out).format == fmt
    original, fixed = params(src), params(out)
    expected, gone = WEIGHT_DEFECTS[defect]
    assert changed_names(original, fixed) == (expected if expected is not None else set(original))
    assert all(torch.isfinite(t).all() for t in fixed.values())

    report = diagnose(out, probe_options(fmt, shapes))
    assert errors(report) == []
    for rule in gone:
        assert fired(report, rule) == [], f"{rule} still fires after the fix"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fix_draws_the_scheme_the_finding_names(exported, tmp_path, fmt):
    """zero_hidden's net.2 (64 -> 64, ReLU) gets He normal: std sqrt(2/64) = 0.177."""
    src, shapes = exported("zero_hidden", fmt)
    out = tmp_path / f"fixed{SUFFIX[fmt]}"
    assert run_fix(src, out, fmt, shapes) == 0
    weight = params(out)["net.2.weight"]
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    assert weight.mean().abs().item() < 0.02


def test_sigmoid_stack_is_not_fixable_by_an_init(exported, tmp_path, capsys):
    """Twelve sigmoids pass at most 1/4 of the gradient each; the rule names no init for it (a
    Xavier re-init trains no better), so `fix` re-draws nothing and says what to do instead."""
    src, shapes = exported("sigmoid_stack", "onnx")
    out = tmp_path / "fixed.onnx"
    assert run_fix(src, out, "onnx", shapes) == 0  # a warning: below the default --fail-on
    text = capsys.readouterr().out
    section = text.split("not fixable by re-initialisation:")[1].split("before:")[0]
    assert "vanishing-gradients" in section and "instead: replace the sigmoid" in section
    assert "re-initialised: nothing" in text
    assert changed_names(params(src), params(out)) == set()


@pytest.mark.parametrize("fmt", FORMATS)
def test_deliberate_zero_head_is_left_byte_for_byte(exported, tmp_path, fmt, capsys):
    src, shapes = exported("zero_head", fmt)
    out = tmp_path / f"fixed{SUFFIX[fmt]}"
    assert run_fix(src, out, fmt, shapes) == 0
    assert "net.6.weight: deliberate (zero-weights, info)" in capsys.readouterr().out
    assert changed_names(params(src), params(out)) == set()


def test_info_tensor_stays_while_its_neighbours_are_fixed(tmp_path):
    model, args = DEFECTS["zero_head"]()  # net.6: a deliberate zero head (info)
    with torch.no_grad():
        model.net[2].weight.mul_(10.0)  # and an oversized hidden layer (init-scale)
    src = export_onnx(model, args, tmp_path / "model.onnx")
    out = tmp_path / "fixed.onnx"
    assert run_fix(src, out, "onnx", []) == 0
    before, after = params(src), params(out)
    assert same_bytes(before["net.6.weight"], after["net.6.weight"])
    assert not same_bytes(before["net.2.weight"], after["net.2.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt, zero_tensors", [
    # torchvision's zero head, and ViT's zero class token
    ("vit_zero_head", "torchscript", 2),
    # BN folded into the convs at export: the four zero-gamma branches arrive as zero convs
    ("resnet_zero_residual", "onnx", 4),
])
def test_zoo_deliberate_zeros_are_untouched(exported, tmp_path, name, fmt, zero_tensors):
    src, shapes = exported(name, fmt)
    out = tmp_path / f"fixed{SUFFIX[fmt]}"
    assert run_fix(src, out, fmt, shapes) == 0
    before, after = params(src), params(out)
    zeros = {n for n, t in before.items() if t.dim() >= 2 and not t.any()}  # not the biases
    assert len(zeros) == zero_tensors
    assert changed_names(before, after) == set()


def test_a_defect_hidden_behind_a_dead_layer_is_fixed_in_a_second_round(tmp_path, capsys):
    """net.3 is dead (bias -10), so nothing reaches net.4, whose 10x He init cannot show. Once
    net.2 is repaired the probe sees it, and the next round re-draws it."""
    from defects import dead_relu

    model, args = dead_relu()
    with torch.no_grad():
        model.net[4].weight.mul_(10.0)
    src = export_torchscript(model, args, tmp_path / "hidden.pt")
    shapes = [list(a.shape) for a in args]
    before = diagnose(src, probe_options("torchscript", shapes))
    assert [f.rule for f in before.findings] == ["dead-relu"]

    out = tmp_path / "fixed.pt"
    assert run_fix(src, out, "torchscript", shapes) == 0
    assert re.search(r"net\.4\.weight\s+he_normal\(.*\)\s+init-scale \(round 2\)",
                     capsys.readouterr().out)
    assert changed_names(params(src), params(out)) == {"net.2.weight", "net.2.bias",
                                                       "net.4.weight"}
    assert diagnose(out, probe_options("torchscript", shapes)).findings == []


def test_same_seed_same_weights_other_seed_other_weights(exported, tmp_path):
    src, shapes = exported("zero_hidden", "torchscript")
    outs = {}
    for label, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        outs[label] = tmp_path / f"{label}.pt"
        assert run_fix(src, outs[label], "torchscript", shapes, "--seed", seed) == 0
    a, b, c = (params(outs[k])["net.2.weight"] for k in "abc")
    assert same_bytes(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lsuv_gives_unit_variance_and_clears_zero_layer(exported, tmp_path, fmt, capsys):
    src, shapes = exported("zero_hidden", fmt)
    out = tmp_path / f"lsuv{SUFFIX[fmt]}"
    assert run_fix(src, out, fmt, shapes, "--init", "lsuv") == 0
    assert "LSUV re-initialises every linear/conv layer (4)" in capsys.readouterr().out

    before, after = params(src), params(out)
    assert changed_names(before, after) >= mlp_weights(0, 2, 4, 6)  # flagged or not
    assert all(not after[f"net.{i}.bias"].any() for i in (0, 2, 4, 6))
    report = diagnose(out, probe_options(fmt, shapes))
    assert fired(report, "zero-weights") == [] and errors(report) == []
    linear = [layer for layer in report.layers if layer.role == "linear"]
    assert len(linear) == 4
    assert all(0.5 <= layer.activation.var <= 2 for layer in linear), \
        [layer.activation.var for layer in linear]
    # Orthogonal start: rows of each square hidden weight stay orthogonal after the rescale.
    w = after["net.2.weight"]
    gram = w @ w.t()
    assert torch.allclose(gram, gram.diagonal().mean() * torch.eye(64), atol=1e-4)


def test_lsuv_lifts_the_gradient_through_a_sigmoid_stack(exported, tmp_path):
    """LSUV is no cure for sigmoids, but unit-variance pre-activations keep each sigmoid near
    its steepest slope: the early/late gradient ratio rises by orders of magnitude."""
    src, shapes = exported("sigmoid_stack", "torchscript")
    out = tmp_path / "lsuv.pt"
    assert run_fix(src, out, "torchscript", shapes, "--init", "lsuv") == 0
    options = probe_options("torchscript", shapes)
    before, after = diagnose(src, options), diagnose(out, options)
    assert errors(after) == []
    ratio = [fired(r, "vanishing-gradients")[0].evidence["early_to_late"] for r in (before, after)]
    assert ratio[1] > 1000 * ratio[0]
    linear = [layer.activation.var for layer in after.layers if layer.role == "linear"]
    assert len(linear) == 13 and all(0.5 <= v <= 2 for v in linear)


def test_lsuv_keeps_a_deliberate_zero_head(exported, tmp_path):
    src, shapes = exported("zero_head", "torchscript")
    out = tmp_path / "lsuv.pt"
    assert run_fix(src, out, "torchscript", shapes, "--init", "lsuv") == 0
    before, after = params(src), params(out)
    assert changed_names(before, after) == mlp_weights(0, 2, 4)
    assert not after["net.6.weight"].any() and not after["net.6.bias"].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dead_gradients_are_reported_not_fixable(exported, tmp_path, fmt, capsys):
    src, shapes = exported("masked_branch", fmt)
    out = tmp_path / f"fixed{SUFFIX[fmt]}"
    assert run_fix(src, out, fmt, shapes) == 1  # the error remains
    text = capsys.readouterr().out
    section = text.split("not fixable by re-initialisation:")[1].split("before:")[0]
    assert "dead-gradients" in section and "fc3" in section
    assert changed_names(params(src), params(out)) == set()


def test_before_after_table_marks_the_fixed_layer(exported, tmp_path, capsys):
    src, shapes = exported("zero_hidden", "onnx")
    assert run_fix(src, tmp_path / "fixed.onnx", "onnx", shapes) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("* net.2 "))
    _, _, op, var_before, var_after, grad_before, grad_after = row.split()
    assert op == "Gemm" and var_before == "0" and float(var_after) > 0.5
    assert re.search(r"net\.2\.weight\s+he_normal\(gain=1\.414, std=0\.1768\)\s+zero-weights", text)
    assert "before: 1 error(s)" in text and "after:  0 error(s)" in text


def test_fix_refuses_to_overwrite_the_model(exported, capsys):
    src, shapes = exported("zero_hidden", "onnx")
    data = src.read_bytes()
    assert run_fix(src, src, "onnx", shapes) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the model itself" in err
    assert src.read_bytes() == data


def test_fix_into_a_missing_folder_is_a_usage_error(exported, tmp_path, capsys):
    src, shapes = exported("zero_hidden", "onnx")
    assert run_fix(src, tmp_path / "nowhere" / "fixed.onnx", "onnx", shapes) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("layout, shape", [("out_in", (64, 32)), ("in_out", (32, 64)),
                                           ("out_in", (16, 8, 3, 3))])
def test_orthogonal_start_respects_the_weight_layout(layout, shape):
    """ONNX MatMul weights are stored (in, out): the orthogonal rows must be output units."""
    w = orthogonal(shape, layout, 1.0, torch.Generator().manual_seed(0))
    assert tuple(w.shape) == shape
    units = w.t() if layout == "in_out" else w.reshape(shape[0], -1)
    rows, cols = units.shape
    small = units @ units.t() if rows <= cols else units.t() @ units
    assert torch.allclose(small, torch.eye(min(rows, cols)), atol=1e-5)


@pytest.mark.slow
def test_a_batchnorm_shift_that_kills_a_relu_is_reset(tmp_path):
    """Norm layers are protected, except a shift the dead-relu finding names as the cause."""
    model = build("resnet")
    with torch.no_grad():
        model.layer1[1].bn1.bias.fill_(-10.0)
    args = example_inputs("resnet", batch=8)
    src = export_torchscript(model, args, tmp_path / "dead_shift.pt")
    shapes = [list(a.shape) for a in args]
    out = tmp_path / "fixed.pt"
    assert run_fix(src, out, "torchscript", shapes) == 0
    before, after = params(src), params(out)
    assert torch.count_nonzero(after["layer1.1.bn1.bias"]) == 0
    # Other norm parameters stay exactly as they were.
    assert same_bytes(before["layer1.1.bn1.weight"], after["layer1.1.bn1.weight"])
    assert same_bytes(before["layer1.0.bn1.bias"], after["layer1.0.bn1.bias"])
    assert not fired(diagnose(out, probe_options("torchscript", shapes)), "dead-relu")


def test_fix_reads_the_same_configuration_as_lint(exported, tmp_path):
    """A TorchScript file's input shape can come from the configuration file, for `fix` as for
    `lint`: no --input-shape on the command line."""
    src, shapes = exported("zero_hidden", "torchscript")
    config = tmp_path / "gradprobe.toml"
    config.write_text('[input-shapes]\n"*.pt" = [%s]\n' % shapes[0])
    out = tmp_path / "fixed.pt"
    assert main(["fix", str(src), "-o", str(out), "--device", "cpu", "--config", str(config)]) == 0
    assert not fired(diagnose(out, probe_options("torchscript", shapes)), "zero-weights")
    # Without the file the shape is missing: the one-line usage error, not a silent default.
    assert main(["fix", str(src), "-o", str(tmp_path / "again.pt"), "--device", "cpu"]) == 2
