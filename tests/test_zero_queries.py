"""A DETR-style decoder starts from zero queries: its first self-attention has nothing to attend.

transformers' MaskFormer (and DETR) feed the decoder `tgt = zeros` plus learnt query positions;
the first layer's values are projections of zeros (its `v_proj` bias), the residual add after
that attention is zero, and the LayerNorm over it divides the gradient it passes back by
sqrt(eps). The TorchScript and legacy ONNX files got an exploding-gradients warning
("6.99e+03x", the library slice keeps the legacy file). In this miniature the legacy file also
showed the first layer's q/k projections "never train": their gradient waits for the zero
`v_proj` bias, a layer's bias, which moves at the first step. The model trains as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import zoo
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(width, width) for _ in range(4))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = self.q_proj(q) @ self.k_proj(k).transpose(1, 2) / q.shape[-1] ** 0.5
        return self.o_proj(torch.softmax(scores, -1) @ self.v_proj(v))


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention, cross-attention, MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.self_attn, self.encoder_attn = Attention(width), Attention(width)
        self.self_attn_layer_norm, self.encoder_attn_layer_norm, self.final_layer_norm = (
            nn.LayerNorm(width) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x + pos, x + pos, x))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x + pos, memory, memory))
        return self.final_layer_norm(x + self.fc2(torch.relu(self.fc1(x))))


class ZeroQueryDecoder(nn.Module):
    def __init__(self, width: int = 32, queries: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, width)
        self.query_position_embeddings = nn.Embedding(queries, width)
        self.layers = nn.ModuleList(DecoderLayer(width) for _ in range(3))
        self.head = nn.Linear(width, 8)
        for m in self.modules():  # transformers' init for DETR-style models
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(features)
        pos = self.query_position_embeddings.weight.unsqueeze(0).expand(features.shape[0], -1, -1)
        x = torch.zeros_like(pos)
        for layer in self.layers:
            x = layer(x, pos, memory)
        return self.head(x)


@pytest.mark.parametrize("how", ["torchscript", "onnx_legacy"])
def test_zero_queries_are_not_a_defect(tmp_path, how):
    torch.manual_seed(0)
    model, x = ZeroQueryDecoder().eval(), torch.randn(2, 10, 16)
    if how == "torchscript":
        path = zoo.export_torchscript(model, (x,), tmp_path / "d.pt")
        options = DiagnoseOptions(device="cpu", input_shapes=[[8, 10, 16]])
    else:
        path = zoo.export_onnx(model, (x,), tmp_path / "d.onnx")
        options = DiagnoseOptions(device="cpu", batch_size=8)
    report = diagnose(path, options)
    assert [f"{f.rule} {f.layer}" for f in report.findings if f.severity.value != "info"] == []


def test_attention_values_stored_as_a_constant_are_not_a_weight(tmp_path):
    """MaskFormer's dynamo file stores the first decoder layer's values, projected from its zero
    queries, as a constant (`transpose_162`) that the attention's probabilities multiply; it was
    read as a zero weight that 'feeds the next layer nothing' (an error)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])
    rng = np.random.default_rng(0)
    tensors = [numpy_helper.from_array(rng.normal(0, 0.35, (8, 4)).astype(np.float32),
                                       "attn.q_proj.weight"),
               numpy_helper.from_array(np.zeros((4, 8), np.float32), "transpose_7"),
               numpy_helper.from_array(np.ones(8, np.float32), "norm.weight"),
               numpy_helper.from_array(np.zeros(8, np.float32), "norm.bias"),
               numpy_helper.from_array(rng.normal(0, 0.35, (8, 8)).astype(np.float32),
                                       "head.weight")]
    nodes = [helper.make_node("MatMul", ["x", "attn.q_proj.weight"], ["scores"], name="q_proj"),
             helper.make_node("Softmax", ["scores"], ["weights"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["weights", "transpose_7"], ["attended"], name="attn"),
             helper.make_node("LayerNormalization", ["attended", "norm.weight", "norm.bias"],
                              ["normed"], axis=-1, name="norm"),
             helper.make_node("MatMul", ["normed", "head.weight"], ["h"], name="head"),
             helper.make_node("Add", ["h", "x"], ["y"], name="skip")]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=tensors)
    path = tmp_path / "values.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    findings = diagnose(path, DiagnoseOptions(device="cpu")).findings
    assert [f for f in findings if f.rule == "zero-weights"] == [], findings
