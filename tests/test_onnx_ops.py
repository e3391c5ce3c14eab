"""The ONNX operator library against the onnx package's own per-operator test cases.

Every single-node case (`onnx/backend/test/data/node/<case>/model.onnx` with
`test_data_set_0/{input,output}_*.pb`) whose operator we register is run through `lookup()` and
compared with the expected outputs. Wheels of onnx >= 1.20 no longer ship that folder, so the
cases are then produced once by onnx's own generator (`onnx.backend.test.case.node`) into the
pytest cache, in the same layout, and reused by later runs.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import gradprobe.diagnostics.onnx_ops  # noqa: F401  (registers every operator)
from gradprobe.diagnostics.errors import InputSpecError, UnsupportedOperator
from gradprobe.diagnostics.onnx_ops.attributes import decode_attributes
from gradprobe.diagnostics.onnx_ops.registry import OpContext, lookup, supported_operators
from gradprobe.diagnostics.onnx_ops.tensors import onnx_dtype_to_torch, tensor_from_proto

SHIPPED_CASES = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"

# Cases we do not pass on purpose, with the reason. Cases whose inputs or outputs use element
# types torch cannot compute with (strings, float8, 4-bit and 2-bit types) are skipped by
# `_unsupported_type` below instead of being listed one by one.
SKIPS: dict[str, str] = {
    # The probe always runs with dropout off, so random training-mode masks are not reproduced.
    "test_training_dropout": "dropout is always identity in the probe",
    "test_training_dropout_default": "dropout is always identity in the probe",
    "test_training_dropout_default_mask": "dropout is always identity in the probe",
    "test_training_dropout_mask": "dropout is always identity in the probe",
}

# Cases whose expected values are written out by hand to fewer digits than float32 carries.
ROUNDED_EXPECTATIONS = {"test_averagepool_2d_ceil_last_window_starts_on_pad": (1e-3, 1e-4)}


# ---------------------------------------------------------------- case discovery


def _case_root(config: pytest.Config) -> Path:
    if SHIPPED_CASES.is_dir():
        return SHIPPED_CASES
    if getattr(config, "cache", None) is not None:
        base = Path(config.cache.mkdir(f"onnx-node-cases-{onnx.__version__}"))
    else:
        base = Path(tempfile.gettempdir()) / f"gradprobe-onnx-node-cases-{onnx.__version__}"
    root = base / "node"
    if not root.is_dir():
        _generate_cases(base, root)
    return root


def _generate_cases(base: Path, root: Path) -> None:
    """Write onnx's generated single-node cases in the shipped on-disk layout."""
    from onnx.backend.test.case.node import collect_testcases

    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=base, prefix="staging-"))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        graph = case.model.graph
        if len(graph.node) != 1 or not all(
            v.type.HasField("tensor_type") for v in [*graph.input, *graph.output]
        ):
            continue
        inputs, outputs = case.data_sets[0]
        case_dir = staging / case.name
        data_dir = case_dir / "test_data_set_0"
        data_dir.mkdir(parents=True)
        (case_dir / "model.onnx").write_bytes(case.model.SerializeToString())
        for prefix, values, infos in (("input", inputs, graph.input),
                                      ("output", outputs, graph.output)):
            for j, (value, info) in enumerate(zip(values, infos, strict=False)):
                proto = value if isinstance(value, onnx.TensorProto) else \
                    numpy_helper.from_array(np.asarray(value), info.name)
                (data_dir / f"{prefix}_{j}.pb").write_bytes(proto.SerializeToString())
    try:
        staging.rename(root)
    except OSError:  # another run finished first; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)


def _load_case(case_dir: Path) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    model = onnx.load(str(case_dir / "model.onnx"))
    return model, model.graph.node[0]


def _discover(config: pytest.Config) -> list[tuple[Path, str]]:
    """(case folder, op type) of every single-node case of a supported operator."""
    return _discover_in(_case_root(config))


@functools.cache
def _discover_in(root: Path) -> list[tuple[Path, str]]:
    supported = set(supported_operators())
    found = []
    for case_dir in sorted(root.iterdir()):
        if not (case_dir / "model.onnx").is_file():
            continue
        model, node = _load_case(case_dir)
        if len(model.graph.node) == 1 and node.domain in ("", "ai.onnx") \
                and node.op_type in supported:
            found.append((case_dir, node.op_type))
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case_dir" in metafunc.fixturenames:
        found = _discover(metafunc.config)
        if metafunc.function.__name__ == "test_backend_case_gradients":
            found = [(c, op) for c, op in found if op in DIFFERENTIABLE]
        cases = [c for c, _ in found]
        metafunc.parametrize("case_dir", cases, ids=[c.name for c in cases])


# ---------------------------------------------------------------- running one case


def _unsupported_type(model: onnx.ModelProto) -> str | None:
    for info in [*model.graph.input, *model.graph.output]:
        elem_type = info.type.tensor_type.elem_type
        try:
            onnx_dtype_to_torch(elem_type)
        except InputSpecError:
            return f"element type {onnx.TensorProto.DataType.Name(elem_type)} is not computed"
    return None


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _prepare(case_dir: Path, device: str = "cpu"):  # type: ignore[no-untyped-def]
    model, node = _load_case(case_dir)
    reason = SKIPS.get(case_dir.name) or _unsupported_type(model)
    if reason:
        pytest.skip(reason)
    data_dir = case_dir / "test_data_set_0"
    values = {}
    for j, info in enumerate(model.graph.input):
        proto = onnx.TensorProto()
        proto.ParseFromString((data_dir / f"input_{j}.pb").read_bytes())
        tensor = tensor_from_proto(proto, None)
        # Float data goes to the device; integer inputs play the role of shape-like constants.
        values[info.name] = tensor.to(device) if tensor.is_floating_point() else tensor
    inputs = [values[name] if name else None for name in node.input]
    attrs = decode_attributes(node)
    training = node.op_type == "BatchNormalization" and attrs.get("training_mode", 0) == 1
    ctx = OpContext(node=node.name or case_dir.name, op_type=node.op_type, opset=_opset(model),
                    num_outputs=len(node.output), training=training)
    return model, node, ctx, inputs, attrs


def _outputs(result, count: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    outs = [result] if isinstance(result, torch.Tensor) else list(result)
    assert len(outs) >= count, f"op returned {len(outs)} outputs, node declares {count}"
    return outs


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype == torch.float64:
        return 1e-7, 1e-9
    if dtype == torch.float16:
        return 2e-3, 2e-3
    if dtype == torch.bfloat16:
        return 1e-2, 1e-2
    return 1e-4, 1e-6


def _check_case(case_dir: Path, device: str) -> None:
    model, node, ctx, inputs, attrs = _prepare(case_dir, device)
    fn = lookup(node.op_type, node.domain, ctx.node)
    outs = _outputs(fn(ctx, inputs, attrs), len(node.output))
    data_dir = case_dir / "test_data_set_0"
    by_name = {info.name: j for j, info in enumerate(model.graph.output)}
    for position, name in enumerate(node.output):
        if not name:
            continue
        proto = onnx.TensorProto()
        proto.ParseFromString((data_dir / f"output_{by_name[name]}.pb").read_bytes())
        expected = tensor_from_proto(proto, None)
        got = outs[position].detach().cpu()
        where = f"output {position} ('{name}')"
        assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != {expected.dtype}"
        assert tuple(got.shape) == tuple(expected.shape), \
            f"{where}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        if expected.is_floating_point():
            rtol, atol = ROUNDED_EXPECTATIONS.get(case_dir.name, _tolerance(expected.dtype))
            np.testing.assert_allclose(got.double().numpy(), expected.double().numpy(),
                                       rtol=rtol, atol=atol, equal_nan=True, err_msg=where)
        else:
            np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=where)


def test_backend_case(case_dir: Path) -> None:
    _check_case(case_dir, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backend_case_cuda(case_dir: Path) -> None:
    """Float data on the accelerator, shape-like integers on the CPU: the loader's layout."""
    _check_case(case_dir, "cuda")


# ---------------------------------------------------------------- gradients

# Ops whose float data input must pass a gradient back.
DIFFERENTIABLE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal", "Erf",
    "MatMul", "Gemm", "Conv", "ConvTranspose", "BatchNormalization", "LayerNormalization",
    "InstanceNormalization", "GroupNormalization", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu",
    "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Softplus", "Softsign",
    "Mish", "Softmax", "LogSoftmax", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
    "ReduceL2", "ReduceSumSquare", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
    "Concat", "Split", "Slice", "Gather", "GatherElements", "Expand", "Tile", "Identity",
    "Where", "Min", "Max", "Sum", "Mean", "Clip", "Dropout", "Trilu", "Pad", "Einsum", "Cos",
    "Sin", "LSTM", "GRU", "RNN", "DepthToSpace", "SpaceToDepth", "Resize", "ScatterND",
    "CumSum", "TopK", "Cast", "CastLike",
}


# Float inputs that only carry a type, a shape or sampling positions, never values that flow.
NO_GRADIENT_INPUTS = {"CastLike": {1}, "Resize": {1, 2}, "Dropout": {1}}


def test_backend_case_gradients(case_dir: Path) -> None:
    """Backward through the op reaches every float input that feeds a float output."""
    model, node, ctx, inputs, attrs = _prepare(case_dir)
    leaves = [t.clone().requires_grad_(True) if t is not None and t.is_floating_point()
              and t.dtype in (torch.float32, torch.float64) else t for t in inputs]
    if not any(t is not None and t.requires_grad for t in leaves):
        pytest.skip("no float32/float64 input")
    outs = _outputs(lookup(node.op_type, node.domain, ctx.node)(ctx, leaves, attrs),
                    len(node.output))
    floats = [o for o in outs if o.requires_grad]
    if not floats:
        pytest.skip("no differentiable output")
    generator = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum()
               for o in floats)
    loss.backward()
    for index, leaf in enumerate(leaves):
        if leaf is not None and leaf.requires_grad \
                and index not in NO_GRADIENT_INPUTS.get(node.op_type, ()):
            assert leaf.grad is not None, f"no gradient reached input {index}"
    forward_finite = all(torch.isfinite(o).all() for o in floats)
    if forward_finite and all(torch.isfinite(t).all() for t in leaves if t is not None
                              and t.is_floating_point()):
        for index, leaf in enumerate(leaves):
            if leaf is not None and leaf.grad is not None:
                assert torch.isfinite(leaf.grad).all(), f"non-finite gradient on input {index}"


# ---------------------------------------------------------------- registry contract


def test_every_supported_operator_has_backend_cases(pytestconfig: pytest.Config) -> None:
    covered = {op for _, op in _discover(pytestconfig)}
    missing = sorted(set(supported_operators()) - covered)
    assert not missing, f"operators without a backend case: {missing}"


def test_unknown_operator_names_op_and_node() -> None:
    with pytest.raises(UnsupportedOperator) as err:
        lookup("FrobnicateV2", "", "/encoder/layer.3/Frobnicate")
    assert "FrobnicateV2" in str(err.value) and "/encoder/layer.3/Frobnicate" in str(err.value)
    with pytest.raises(UnsupportedOperator, match="com.example::Relu"):
        lookup("Relu", "com.example", "n1")
