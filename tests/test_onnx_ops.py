"""The ONNX operator library against the onnx package's own per-operator test cases.

Every single-node case (`onnx/backend/test/data/node/<case>/model.onnx` with
`test_data_set_0/{input,output}_*.pb`) whose operator we register is run through `lookup()` and
compared with the expected outputs. Wheels of onnx >= 1.20 no longer ship that folder, so the
cases are then produced once by onnx's own generator (`onnx.backend.test.case.node`) into the
pytest cache, in the same layout, and reused by later runs.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import gradprobe.diagnostics.onnx_ops  # noqa: F401  (registers every operator)
from gradprobe.diagnostics.errors import InputSpecError, ModelLoadError, UnsupportedOperator
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


# Float inputs that decide output shapes or sampling grids. They are constants in real graphs,
# read on the host, and stay on the CPU like integer shape tensors.
SHAPE_INPUTS = {"Range": {0, 1, 2}, "OneHot": {1}, "Resize": {1, 2, 3}, "Upsample": {1}}


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
        values[info.name] = tensor_from_proto(proto, None)
    host_only = SHAPE_INPUTS.get(node.op_type, set())
    inputs = []
    for position, name in enumerate(node.input):
        tensor = values[name] if name else None
        # Float data goes to the device; integer inputs play the role of shape-like constants.
        if tensor is not None and tensor.is_floating_point() and position not in host_only:
            tensor = tensor.to(device)
        inputs.append(tensor)
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
        got = outs[position].detach()
        where = f"output {position} ('{name}')"
        assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != {expected.dtype}"
        assert tuple(got.shape) == tuple(expected.shape), \
            f"{where}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        if got.is_floating_point() and any(t is not None and t.device.type == device
                                           for t in inputs):
            assert got.device.type == device, f"{where}: float result left {device}"
        if got.device.type == "meta":
            continue  # no values on the meta device
        got = got.cpu()
        if expected.is_floating_point():
            rtol, atol = ROUNDED_EXPECTATIONS.get(case_dir.name, _tolerance(expected.dtype))
            np.testing.assert_allclose(got.double().numpy(), expected.double().numpy(),
                                       rtol=rtol, atol=atol, equal_nan=True, err_msg=where)
        else:
            np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=where)


def test_backend_case(case_dir: Path) -> None:
    _check_case(case_dir, "cpu")


ACCELERATOR = "cuda" if torch.cuda.is_available() else "meta"


def test_backend_case_on_accelerator(case_dir: Path) -> None:
    """Float data on the accelerator, shape-like integers on the CPU: the loader's layout.

    Without a GPU the meta device stands in: it has no values, but any mix of CPU and device
    tensors, and any read of device data (a sync), raises; shapes and dtypes are still checked.
    """
    _check_case(case_dir, ACCELERATOR)


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
    "CumSum", "TopK", "Cast", "CastLike", "Col2Im",
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


def test_trilu_passes_gradients_to_float_data() -> None:
    # Trilu's backend cases hold integers only.
    x = torch.randn(3, 4, requires_grad=True)
    ctx = OpContext(node="t", op_type="Trilu", opset=14, num_outputs=1)
    lookup("Trilu", "", "t")(ctx, [x, torch.tensor(1)], {"upper": 0}).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4).tril(1))


# ---------------------------------------------------------------- registry contract


# onnx ships no backend case for random draws (their values are unspecified):
# tests/test_onnx_random_ops.py checks their range, moments and reproducibility instead.
WITHOUT_BACKEND_CASES = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                                   "RandomUniformLike"})


def test_every_supported_operator_has_backend_cases(pytestconfig: pytest.Config) -> None:
    covered = {op for _, op in _discover(pytestconfig)}
    missing = sorted(set(supported_operators()) - covered - WITHOUT_BACKEND_CASES)
    assert not missing, f"operators without a backend case: {missing}"


def test_unknown_operator_names_op_and_node() -> None:
    with pytest.raises(UnsupportedOperator) as err:
        lookup("FrobnicateV2", "", "/encoder/layer.3/Frobnicate")
    assert "FrobnicateV2" in str(err.value) and "/encoder/layer.3/Frobnicate" in str(err.value)
    with pytest.raises(UnsupportedOperator, match="com.example::Relu"):
        lookup("Relu", "com.example", "n1")


# ---------------------------------------------------------------- against onnxruntime
#
# The backend cases pin the newest opset of each operator. Real exports also carry older
# forms (axes and split as attributes, Clip bounds as attributes, Softmax coercing to 2D) and
# options the cases leave out (uneven sequence lengths, clip, layouts); onnxruntime, which
# every exporter is tested against, is the reference for those.

_ONNX_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT,
               np.dtype(np.int64): onnx.TensorProto.INT64,
               np.dtype(np.int32): onnx.TensorProto.INT32,
               np.dtype(np.bool_): onnx.TensorProto.BOOL}


def _against_ort(op_type: str, feeds: dict[str, np.ndarray | None], outputs: list[str],
                 opset: int, out_types: tuple[int, ...] = (), rtol: float = 1e-4,
                 atol: float = 1e-5, **attributes) -> list[torch.Tensor]:
    """Run one node in onnxruntime and through our op; assert equal outputs; return ours."""
    import onnxruntime as ort

    names = [name if value is not None else "" for name, value in feeds.items()]
    node = onnx.helper.make_node(op_type, names, outputs, name=f"{op_type}_under_test",
                                 **attributes)
    present = {k: v for k, v in feeds.items() if v is not None}
    graph = onnx.helper.make_graph(
        [node], "one_node",
        [onnx.helper.make_tensor_value_info(k, _ONNX_TYPES[v.dtype], v.shape)
         for k, v in present.items()],
        [onnx.helper.make_tensor_value_info(o, out_types[i] if i < len(out_types)
                                            else onnx.TensorProto.FLOAT, None)
         for i, o in enumerate(outputs) if o])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    options = ort.SessionOptions()
    # The reference is the kernel itself; graph rewrites only add risk (one crashes on
    # LayerNormalization without bias).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, present)

    ctx = OpContext(node=node.name, op_type=op_type, opset=opset, num_outputs=len(outputs),
                    training=False)
    inputs = [torch.from_numpy(v.copy()) if v is not None else None for v in feeds.values()]
    ours = _outputs(lookup(op_type, "", node.name)(ctx, inputs, decode_attributes(node)),
                    len(outputs))
    ours = [o for o, name in zip(ours, outputs, strict=False) if name]
    for index, (got, want) in enumerate(zip(ours, expected, strict=True)):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=rtol, atol=atol,
                                   err_msg=f"{op_type} output {index}")
    return ours


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_uneven_lengths_peepholes_clip_match_ort(direction: str) -> None:
    seq, batch, size, hidden = 5, 3, 4, 6
    dirs = 2 if direction == "bidirectional" else 1
    feeds = {"X": _randn(seq, batch, size, seed=1),
             "W": _randn(dirs, 4 * hidden, size, seed=2, scale=0.5),
             "R": _randn(dirs, 4 * hidden, hidden, seed=3, scale=0.5),
             "B": _randn(dirs, 8 * hidden, seed=4, scale=0.3),
             "sequence_lens": np.array([5, 2, 4], dtype=np.int32),
             "initial_h": _randn(dirs, batch, hidden, seed=5),
             "initial_c": _randn(dirs, batch, hidden, seed=6),
             "P": _randn(dirs, 3 * hidden, seed=7, scale=0.3)}
    attrs = {"hidden_size": hidden, "direction": direction, "clip": 1.5}
    y, y_h, y_c = _against_ort("LSTM", feeds, ["Y", "Y_h", "Y_c"], opset=14, **attrs)

    # onnxruntime has no batch-major layout; it must equal the time-major result transposed.
    batch_major = dict(feeds)
    for name in ("X", "initial_h", "initial_c"):
        batch_major[name] = torch.from_numpy(feeds[name]).transpose(0, 1)
    ctx = OpContext(node="lstm", op_type="LSTM", opset=14, num_outputs=3)
    inputs = [torch.as_tensor(v) for v in batch_major.values()]
    y1, y_h1, y_c1 = lookup("LSTM", "", "lstm")(ctx, inputs, {**attrs, "layout": 1})
    torch.testing.assert_close(y1, y.permute(2, 0, 1, 3))
    torch.testing.assert_close(y_h1, y_h.transpose(0, 1))
    torch.testing.assert_close(y_c1, y_c.transpose(0, 1))


@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_matches_ort(linear_before_reset: int, direction: str) -> None:
    seq, batch, size, hidden = 4, 2, 3, 5
    dirs = 2 if direction == "bidirectional" else 1
    feeds = {"X": _randn(seq, batch, size, seed=1),
             "W": _randn(dirs, 3 * hidden, size, seed=2, scale=0.5),
             "R": _randn(dirs, 3 * hidden, hidden, seed=3, scale=0.5),
             "B": _randn(dirs, 6 * hidden, seed=4, scale=0.3),
             "sequence_lens": np.array([4, 3], dtype=np.int32),
             "initial_h": _randn(dirs, batch, hidden, seed=5)}
    _against_ort("GRU", feeds, ["Y", "Y_h"], opset=14, hidden_size=hidden,
                 direction=direction, linear_before_reset=linear_before_reset)


def test_rnn_custom_activation_reverse_matches_ort() -> None:
    seq, batch, size, hidden = 4, 2, 3, 5
    feeds = {"X": _randn(seq, batch, size, seed=1),
             "W": _randn(1, hidden, size, seed=2), "R": _randn(1, hidden, hidden, seed=3),
             "B": _randn(1, 2 * hidden, seed=4)}
    _against_ort("RNN", feeds, ["Y", "Y_h"], opset=14, hidden_size=hidden,
                 direction="reverse", activations=["Relu"])


def test_recurrent_gradients_reach_every_weight() -> None:
    seq, batch, size, hidden = 3, 2, 3, 4
    leaves = {
        "W": torch.randn(2, 4 * hidden, size), "R": torch.randn(2, 4 * hidden, hidden),
        "B": torch.randn(2, 8 * hidden), "initial_h": torch.randn(2, batch, hidden),
        "initial_c": torch.randn(2, batch, hidden), "P": torch.randn(2, 3 * hidden),
    }
    for t in leaves.values():
        t.requires_grad_(True)
    x = torch.randn(seq, batch, size)
    ctx = OpContext(node="lstm", op_type="LSTM", opset=14, num_outputs=3)
    inputs = [x, leaves["W"], leaves["R"], leaves["B"], None, leaves["initial_h"],
              leaves["initial_c"], leaves["P"]]
    y, y_h, y_c = lookup("LSTM", "", "lstm")(ctx, inputs, {"hidden_size": hidden,
                                                          "direction": "bidirectional"})
    (y.sum() + y_h.sum() + y_c.sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, f"no gradient for {name}"


def test_lstm_coupled_gates_are_refused_by_name() -> None:
    ctx = OpContext(node="/enc/lstm/LSTM", op_type="LSTM", opset=14, num_outputs=1)
    x, w, r = torch.randn(2, 1, 3), torch.randn(1, 8, 3), torch.randn(1, 8, 2)
    with pytest.raises(UnsupportedOperator, match="input_forget.*|.*/enc/lstm/LSTM"):
        lookup("LSTM", "", ctx.node)(ctx, [x, w, r], {"hidden_size": 2, "input_forget": 1})


# Older opset forms: attributes that later became inputs.


def test_split_with_split_attribute_opset11() -> None:
    ours = _against_ort("Split", {"x": _randn(7, 4)}, ["a", "b", "c"], opset=11,
                        axis=0, split=[2, 4, 1])
    assert [tuple(o.shape) for o in ours] == [(2, 4), (4, 4), (1, 4)]


def test_split_equal_parts_without_sizes_opset13() -> None:
    _against_ort("Split", {"x": _randn(2, 6)}, ["a", "b", "c"], opset=13, axis=1)


@pytest.mark.parametrize("op_type", ["Squeeze", "Unsqueeze"])
def test_squeeze_family_axes_attribute_opset11(op_type: str) -> None:
    x = _randn(3, 1, 4, 1)
    _against_ort(op_type, {"x": x}, ["y"], opset=11, axes=[1, -1] if op_type == "Squeeze"
                 else [0, 5])


@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceMax", "ReduceL2", "ReduceProd",
                                     "ReduceSumSquare", "ReduceLogSumExp"])
def test_reductions_axes_attribute_opset13(op_type: str) -> None:
    _against_ort(op_type, {"x": _randn(2, 3, 4)}, ["y"], opset=13, axes=[0, -1], keepdims=0)


def test_reduce_sum_axes_attribute_opset11() -> None:
    _against_ort("ReduceSum", {"x": _randn(2, 3, 4)}, ["y"], opset=11, axes=[1])


def test_reduce_sum_axes_input_opset13() -> None:
    _against_ort("ReduceSum", {"x": _randn(2, 3, 4), "axes": np.array([0, 2])}, ["y"],
                 opset=13, keepdims=1)


def test_clip_bounds_as_attributes_opset6() -> None:
    _against_ort("Clip", {"x": _randn(3, 5)}, ["y"], opset=6, min=-0.5, max=0.25)


def test_clip_with_only_max_input_opset13() -> None:
    _against_ort("Clip", {"x": _randn(3, 5), "min": None,
                          "max": np.array(0.1, dtype=np.float32)}, ["y"], opset=13)


@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
def test_softmax_coerces_to_2d_before_opset13(op_type: str) -> None:
    _against_ort(op_type, {"x": _randn(2, 3, 4)}, ["y"], opset=11, axis=1)


def test_slice_attributes_opset9() -> None:
    _against_ort("Slice", {"x": _randn(4, 6)}, ["y"], opset=9, starts=[1, -4],
                 ends=[1000, -1], axes=[0, 1])


def test_slice_negative_steps_opset13() -> None:
    feeds = {"x": _randn(5, 6), "starts": np.array([-1, 4]), "ends": np.array([-1000, 0]),
             "axes": np.array([0, 1]), "steps": np.array([-2, -3])}
    _against_ort("Slice", feeds, ["y"], opset=13)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_attributes_opset2(mode: str) -> None:
    _against_ort("Pad", {"x": _randn(1, 2, 4, 5)}, ["y"], opset=2, mode=mode,
                 pads=[0, 0, 1, 2, 0, 0, 3, 1], value=1.5)


def test_pad_negative_pads_and_value_input_opset13() -> None:
    feeds = {"x": _randn(3, 5), "pads": np.array([1, -1, -1, 2]),
             "value": np.array(-2.0, dtype=np.float32)}
    _against_ort("Pad", feeds, ["y"], opset=13)


def test_topk_k_attribute_opset1() -> None:
    _against_ort("TopK", {"x": _randn(3, 6)}, ["v", "i"], opset=1, k=2,
                 out_types=(onnx.TensorProto.FLOAT, onnx.TensorProto.INT64))


def test_batchnorm_inference_opset9() -> None:
    feeds = {"x": _randn(2, 3, 4, 4), "scale": _randn(3, seed=1),
             "bias": _randn(3, seed=2), "mean": _randn(3, seed=3),
             "var": np.abs(_randn(3, seed=4)) + 0.5}
    _against_ort("BatchNormalization", feeds, ["y"], opset=9, epsilon=1e-3)


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_single_output_matches_ort(with_bias: bool) -> None:
    # The export's usual form (one output, scale over the last axis) takes torch's fused path.
    feeds = {"x": _randn(2, 5, 8), "scale": _randn(8, seed=1),
             "bias": _randn(8, seed=2) if with_bias else None}
    _against_ort("LayerNormalization", feeds, ["y"], opset=17, epsilon=1e-6)
    feeds = {"x": _randn(2, 5, 8), "scale": _randn(5, 8, seed=1), "bias": _randn(5, 8, seed=2)}
    _against_ort("LayerNormalization", feeds, ["y"], opset=17, axis=-2)


def test_layer_norm_broadcast_scale_over_two_axes() -> None:
    # onnxruntime crashes on a broadcast bias here; torch's own layer_norm is the reference.
    x, scale, bias = torch.randn(2, 5, 8), torch.randn(8), torch.randn(1, 8)
    ctx = OpContext(node="ln", op_type="LayerNormalization", opset=17, num_outputs=1)
    y = lookup("LayerNormalization", "", "ln")(ctx, [x, scale, bias], {"axis": -2})
    expected = torch.nn.functional.layer_norm(x, (5, 8), scale.expand(5, 8),
                                              bias.expand(5, 8), 1e-5)
    torch.testing.assert_close(y, expected)


def test_group_norm_per_group_scale_opset18() -> None:
    x = torch.from_numpy(_randn(2, 6, 3, 3))
    scale, bias = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.1, 0.2, 0.3])
    ctx = OpContext(node="gn", op_type="GroupNormalization", opset=18, num_outputs=1)
    y = lookup("GroupNormalization", "", "gn")(ctx, [x, scale, bias], {"num_groups": 3})
    expected = torch.nn.functional.group_norm(x, 3, scale.repeat_interleave(2),
                                              bias.repeat_interleave(2), 1e-5)
    torch.testing.assert_close(y, expected)


def test_resize_opset10_nearest_upsample() -> None:
    feeds = {"x": _randn(1, 2, 3, 4), "scales": np.array([1, 1, 2, 1.5], dtype=np.float32)}
    _against_ort("Resize", feeds, ["y"], opset=10, mode="nearest")


@pytest.mark.parametrize("transform", ["half_pixel", "pytorch_half_pixel", "align_corners",
                                       "asymmetric"])
def test_resize_linear_sizes_matches_ort(transform: str) -> None:
    feeds = {"x": _randn(1, 2, 5, 7), "roi": None, "scales": None,
             "sizes": np.array([1, 2, 8, 3])}
    _against_ort("Resize", feeds, ["y"], opset=13, mode="linear",
                 coordinate_transformation_mode=transform)


# Convolution and pooling geometry beyond the backend cases.


@pytest.mark.parametrize("auto_pad", ["SAME_LOWER", "SAME_UPPER", "VALID"])
def test_conv1d_and_3d_auto_pad_dilation_groups_match_ort(auto_pad: str) -> None:
    # onnxruntime refuses dilation together with SAME padding.
    dilation = [2] if auto_pad == "VALID" else [1]
    _against_ort("Conv", {"x": _randn(2, 4, 9), "w": _randn(6, 2, 3, seed=1)}, ["y"],
                 opset=13, auto_pad=auto_pad, strides=[2], dilations=dilation, group=2)
    _against_ort("Conv", {"x": _randn(1, 2, 5, 6, 4), "w": _randn(3, 2, 2, 3, 2, seed=1),
                          "b": _randn(3, seed=2)}, ["y"], opset=13, auto_pad=auto_pad,
                 strides=[1, 2, 1])


def test_conv_asymmetric_pads_match_ort() -> None:
    _against_ort("Conv", {"x": _randn(1, 3, 7, 6), "w": _randn(4, 3, 3, 3, seed=1)}, ["y"],
                 opset=13, pads=[0, 2, 1, 0], strides=[2, 1])


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]},
    {"strides": [3, 2], "output_shape": [10, 8]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER", "group": 2},
    {"strides": [2, 1], "pads": [1, 1, 1, 1], "dilations": [2, 1]},
])
def test_conv_transpose_geometry_matches_ort(attrs: dict) -> None:
    groups = attrs.get("group", 1)
    feeds = {"x": _randn(1, 2, 3, 3), "w": _randn(2, 3 // groups * groups // groups, 3, 3,
                                                   seed=1), "b": _randn(3 // groups * groups,
                                                                        seed=2)}
    if groups == 2:
        feeds["w"], feeds["b"] = _randn(2, 2, 3, 3, seed=1), _randn(4, seed=2)
    _against_ort("ConvTranspose", feeds, ["y"], opset=13, **attrs)


@pytest.mark.parametrize("op_type", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [0, 1, 1, 0]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
])
def test_pool_geometry_matches_ort(op_type: str, attrs: dict) -> None:
    if op_type == "MaxPool":
        attrs = {k: v for k, v in attrs.items() if k != "count_include_pad"}
    _against_ort(op_type, {"x": _randn(1, 2, 7, 8)}, ["y"], opset=13, **attrs)


def test_maxpool_1d_and_3d_ceil_mode_match_ort() -> None:
    _against_ort("MaxPool", {"x": _randn(2, 3, 10)}, ["y"], opset=13, kernel_shape=[3],
                 strides=[2], ceil_mode=1)
    _against_ort("MaxPool", {"x": _randn(1, 1, 5, 6, 7)}, ["y"], opset=13,
                 kernel_shape=[2, 2, 3], strides=[2, 2, 2], ceil_mode=1)


# ---------------------------------------------------------------- probe-mode semantics


def test_batchnorm_follows_probe_training_not_the_node_attribute() -> None:
    x = torch.randn(8, 3, 4, 4) * 5 + 2
    scale, bias = torch.ones(3), torch.zeros(3)
    mean, var = torch.zeros(3), torch.full((3,), 1e6)  # running stats far from the batch's
    fn = lookup("BatchNormalization", "", "bn")
    train = OpContext(node="bn", op_type="BatchNormalization", opset=15, num_outputs=3,
                      training=True)
    y, running_mean, running_var = fn(train, [x, scale, bias, mean, var],
                                      {"training_mode": 0, "momentum": 0.9})
    dims = (0, 2, 3)
    torch.testing.assert_close(y.mean(dim=dims), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=dims, correction=0), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(running_mean, 0.9 * mean + 0.1 * x.mean(dim=dims))
    torch.testing.assert_close(running_var, 0.9 * var + 0.1 * x.var(dim=dims, correction=0))
    single = OpContext(node="bn", op_type="BatchNormalization", opset=15, num_outputs=1,
                       training=True)
    torch.testing.assert_close(fn(single, [x, scale, bias, mean, var], {}), y)
    infer = OpContext(node="bn", op_type="BatchNormalization", opset=15, num_outputs=1,
                      training=False)
    y_eval = fn(infer, [x, scale, bias, mean, var], {})
    assert float(y_eval.abs().max()) < 0.05  # running stats squash the activations


def test_batchnorm_single_value_per_channel_in_training() -> None:
    # batch 1 and 1x1 spatial (an SE block): no error, normalised output is zero.
    ctx = OpContext(node="bn", op_type="BatchNormalization", opset=15, num_outputs=1)
    y = lookup("BatchNormalization", "", "bn")(
        ctx, [torch.randn(1, 4, 1, 1), torch.ones(4), torch.zeros(4), torch.zeros(4),
              torch.ones(4)], {})
    assert torch.equal(y, torch.zeros(1, 4, 1, 1))


def test_dropout_is_identity_even_in_training_mode() -> None:
    x = torch.randn(4, 5)
    ctx = OpContext(node="drop", op_type="Dropout", opset=13, num_outputs=2)
    y, mask = lookup("Dropout", "", "drop")(ctx, [x, torch.tensor(0.5), torch.tensor(True)], {})
    assert y is x and mask.dtype == torch.bool and bool(mask.all())


def test_shape_results_stay_on_cpu_and_gather_follows_data() -> None:
    meta = torch.randn(2, 3, device="meta")
    ctx = OpContext(node="s", op_type="Shape", opset=15, num_outputs=1)
    shape_out = lookup("Shape", "", "s")(ctx, [meta], {})
    assert shape_out.device.type == "cpu" and shape_out.tolist() == [2, 3]
    table = torch.randn(10, 4, device="meta")
    ids = torch.tensor([[1, 2], [3, -1]])
    ctx = OpContext(node="g", op_type="Gather", opset=13, num_outputs=1)
    picked = lookup("Gather", "", "g")(ctx, [table, ids], {})
    assert picked.device.type == "meta" and tuple(picked.shape) == (2, 2, 4)


# ---------------------------------------------------------------- tensors and attributes


def test_tensor_from_proto_typed_fields_and_raw_agree() -> None:
    for array in (np.array([[1.5, -2.25]], dtype=np.float16), np.array([3, -4], dtype=np.int8),
                  np.array([True, False]), np.array([7, 9], dtype=np.uint16),
                  np.array([1 << 40], dtype=np.int64), np.array([2.5], dtype=np.float64)):
        raw = tensor_from_proto(numpy_helper.from_array(array, "t"), None)
        elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        typed = tensor_from_proto(onnx.helper.make_tensor("t", elem, array.shape,
                                                          array.flatten().tolist()), None)
        assert raw.dtype == typed.dtype and torch.equal(raw, typed)
        np.testing.assert_array_equal(raw.numpy(), array)


def test_tensor_from_proto_bfloat16() -> None:
    values = torch.tensor([1.0, -2.5, 3.0e38], dtype=torch.bfloat16)
    proto = onnx.TensorProto(name="b", data_type=onnx.TensorProto.BFLOAT16, dims=[3],
                             raw_data=values.view(torch.uint16).numpy().tobytes())
    assert torch.equal(tensor_from_proto(proto, None), values)


def test_tensor_from_proto_external_data(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8 + array.tobytes())
    proto = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[3, 4],
                             data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "8"), ("length", "48")):
        proto.external_data.add(key=key, value=value)
    np.testing.assert_array_equal(tensor_from_proto(proto, tmp_path).numpy(), array)

    escaping = onnx.TensorProto()
    escaping.CopyFrom(proto)
    escaping.external_data[0].value = "../outside.bin"
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        tensor_from_proto(escaping, tmp_path)
    truncated = onnx.TensorProto()
    truncated.CopyFrom(proto)
    truncated.external_data[2].value = "4096"
    with pytest.raises(ModelLoadError, match="truncated"):
        tensor_from_proto(truncated, tmp_path)


def test_unsupported_element_types_are_named() -> None:
    strings = onnx.helper.make_tensor("labels", onnx.TensorProto.STRING, [1], [b"cat"])
    with pytest.raises(ModelLoadError, match="labels.*STRING"):
        tensor_from_proto(strings, None)
    with pytest.raises(InputSpecError, match="FLOAT8E4M3FN"):
        onnx_dtype_to_torch(onnx.TensorProto.FLOAT8E4M3FN)


def test_decode_attributes_values_and_subgraphs() -> None:
    node = onnx.helper.make_node(
        "Foo", ["x"], ["y"], name="foo", alpha=0.5, axes=[1, 2], mode="edge",
        names=["a", "b"], value=numpy_helper.from_array(np.array([1, 2], dtype=np.int32)))
    attrs = decode_attributes(node)
    assert attrs["alpha"] == 0.5 and attrs["axes"] == [1, 2] and attrs["mode"] == "edge"
    assert attrs["names"] == ["a", "b"]
    assert attrs["value"].dtype == torch.int32 and attrs["value"].tolist() == [1, 2]
    body = onnx.helper.make_graph([], "body", [], [])
    branch = onnx.helper.make_node("If", ["c"], ["y"], name="/model/If_3", then_branch=body,
                                   else_branch=body)
    assert set(decode_attributes(branch)) == {"then_branch", "else_branch"}  # If runs
    loop = onnx.helper.make_node("Loop", ["n", "c"], ["y"], name="/model/Loop_7", body=body)
    with pytest.raises(UnsupportedOperator, match="Loop.*/model/Loop_7"):
        decode_attributes(loop)


# ---------------------------------------------------------------- real exports, node by node


def _interpret(path: Path, feeds: dict[str, torch.Tensor],
               trainable: bool = False) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run an exported graph node by node through the registry (a test-sized interpreter)."""
    model = onnx.load(str(path), load_external_data=False)
    opset = _opset(model)
    weights = {}
    for init in model.graph.initializer:
        tensor = tensor_from_proto(init, path.parent)
        if trainable and tensor.is_floating_point():
            tensor.requires_grad_(True)
        weights[init.name] = tensor
    values: dict[str, torch.Tensor] = {**weights, **feeds}
    for node in model.graph.node:
        attrs = decode_attributes(node, path.parent)
        ctx = OpContext(node=node.name, op_type=node.op_type, opset=opset,
                        num_outputs=len(node.output),
                        training=bool(attrs.get("training_mode", 0)))
        result = lookup(node.op_type, node.domain, node.name)(
            ctx, [values[name] if name else None for name in node.input], attrs)
        outs = [result] if isinstance(result, torch.Tensor) else list(result)
        values.update((name, out) for name, out in zip(node.output, outs, strict=False) if name)
    return [values[o.name] for o in model.graph.output], weights


def _ort_run(path: Path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


# ResNet's operators are covered by the BatchNorm export below, the MLP's by every model here.
@pytest.mark.parametrize("name", ["mobilenet", "vit", "text_encoder", "lstm", "gru"])
def test_legacy_exports_match_onnxruntime_and_train(name: str, tmp_path: Path) -> None:
    from zoo import build, example_inputs, export_onnx

    args = example_inputs(name)
    path = export_onnx(build(name), args, tmp_path / f"{name}.onnx")
    feeds = {f"input{i}": a for i, a in enumerate(args)}
    (ours,), weights = _interpret(path, feeds, trainable=True)
    (expected,) = _ort_run(path, feeds)
    np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-4, atol=1e-5)

    ours.backward(torch.randn(ours.shape, generator=torch.Generator().manual_seed(0)))
    matrices = {n: w for n, w in weights.items() if w.requires_grad and w.dim() >= 2}
    assert matrices, "no weight matrices found"
    for weight_name, weight in matrices.items():
        assert weight.grad is not None and torch.isfinite(weight.grad).all(), weight_name
        assert weight.grad.abs().sum() > 0, f"zero gradient for {weight_name}"


def test_legacy_export_with_training_batchnorm_matches_onnxruntime(tmp_path: Path) -> None:
    from zoo import build, example_inputs, export_onnx

    args = example_inputs("resnet")
    path = export_onnx(build("resnet"), args, tmp_path / "resnet_bn.onnx", train_bn=True)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    feeds = {"input0": args[0]}
    ours, _ = _interpret(path, feeds)
    expected = _ort_run(path, feeds)
    np.testing.assert_allclose(ours[0].detach().numpy(), expected[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("data_shape", [(3, 4, 0), (3, 0, 2)])
def test_scatter_nd_into_empty_slices_matches_ort(data_shape: tuple[int, ...]) -> None:
    # The dynamo export of torchvision's swin3d_s writes its shifted-window mask with ScatterND;
    # at a small probe size some mask regions are empty.
    indices = np.array([[0], [2]], dtype=np.int64)
    _against_ort("ScatterND", {"data": np.zeros(data_shape, np.float32), "indices": indices,
                               "updates": np.ones((2, *data_shape[1:]), np.float32)},
                 ["y"], opset=16)


def test_split_sizes_that_do_not_fit_the_input_are_an_input_error_not_an_unsupported_op() -> None:
    # A trace freezes data-dependent split sizes (switch_transformers' tokens per expert).
    ctx = OpContext(node="experts/Split", op_type="Split", opset=13, num_outputs=2)
    with pytest.raises(ValueError, match=r"do not add up to 8.*shape \[8, 4\]"):
        lookup("Split", "", ctx.node)(ctx, [torch.randn(8, 4), torch.tensor([3, 3])], {})


@pytest.mark.parametrize(("last", "inverse", "onesided", "length"),
                         [(1, 0, 0, None), (1, 0, 1, None), (2, 0, 0, None), (2, 1, 0, None),
                          (2, 1, 1, None), (1, 0, 0, 10), (2, 0, 0, 5)])
def test_dft_matches_ort(last: int, inverse: int, onesided: int, length: int | None) -> None:
    # FNet mixes its tokens with torch.fft; the dynamo exporter writes that as DFT (opset 20:
    # the axis is an input). Opset 17 keeps it as an attribute.
    feeds = {"x": _randn(2, 8, 3, last, seed=11),
             "dft_length": None if length is None else np.array(length, dtype=np.int64),
             "axis": np.array(-3, dtype=np.int64)}
    _against_ort("DFT", feeds, ["y"], opset=20, inverse=inverse, onesided=onesided)
    old = {"x": feeds["x"], "dft_length": feeds["dft_length"]}
    _against_ort("DFT", old, ["y"], opset=17, axis=1, inverse=inverse, onesided=onesided)


def test_dft_passes_gradients() -> None:
    ctx = OpContext(node="dft", op_type="DFT", opset=20, num_outputs=1)
    x = torch.randn(2, 8, 1, requires_grad=True)
    lookup("DFT", "", "dft")(ctx, [x, None, torch.tensor(1)], {}).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("image", "block", "attributes"), [
    ((6, 6), (2, 2), {"strides": [2, 2]}),  # MobileViTv2's fold of its 2x2 patches
    ((5, 7), (3, 3), {}),
    ((5, 6), (3, 2), {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 1]}),
])
def test_col2im_matches_ort(image: tuple[int, int], block: tuple[int, int],
                            attributes: dict) -> None:
    strides = attributes.get("strides", [1, 1])
    dilations = attributes.get("dilations", [1, 1])
    pads = attributes.get("pads", [0, 0, 0, 0])
    blocks = math.prod((image[i] + pads[i] + pads[i + 2] - dilations[i] * (block[i] - 1) - 1)
                       // strides[i] + 1 for i in range(2))
    feeds = {"x": _randn(2, 3 * block[0] * block[1], blocks, seed=5),
             "image_shape": np.array(image, dtype=np.int64),
             "block_shape": np.array(block, dtype=np.int64)}
    _against_ort("Col2Im", feeds, ["y"], opset=18, **attributes)
