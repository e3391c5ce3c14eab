"""A parameter that shapes only positions the output never reads gets exactly zero gradient,
harmlessly: info, not "will never train" as an error.

timm's class-token models with relative positions (vit_relpos_medium_patch16_cls_224,
mvitv2_small_cls) read only the class token in the head. In the last block the relative-position
MLP (or table, or the query pooling) shapes the attention of the patch queries only: the class
token's bias row is padded with zeros. Eager PyTorch gives those parameters exactly zero
gradient too. The probe sees it in the gradient's reach: the last block's output gets gradient
at the class token's entries only, where the block before gets it everywhere.
"""

from __future__ import annotations

import pytest
import timm
import torch
import zoo

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions

SHAPE = [4, 3, 32, 32]


def relpos_cls_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_relpos_medium_patch16_cls_224", pretrained=False, img_size=32,
                             patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)


def test_eager_pytorch_gives_the_last_block_table_zero_gradient():
    model = relpos_cls_vit().train()
    model(torch.randn(*SHAPE)).square().sum().backward()
    last, before = model.blocks[-1].attn.rel_pos.mlp.fc1, model.blocks[-2].attn.rel_pos.mlp.fc1
    assert torch.count_nonzero(last.weight.grad) == 0
    assert torch.count_nonzero(before.weight.grad) > 0


@pytest.mark.parametrize("how", ["torchscript", "onnx"])
def test_table_of_unread_positions_is_info(tmp_path, how):
    model, x = relpos_cls_vit(), torch.randn(*SHAPE)
    path = (zoo.export_torchscript(model, (x,), tmp_path / "vit.pt") if how == "torchscript"
            else zoo.export_onnx(model, (x,), tmp_path / "vit.onnx"))
    findings = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[SHAPE])).findings
    assert [(f.rule, f.layer) for f in findings if f.severity.value != "info"] == []
    unread = [f for f in findings if f.evidence.get("unread_positions")]
    # the legacy exporter names the MLP by scope (`blocks.2.attn.mlp.fc1`)
    assert unread and all(f.layer.startswith("blocks.2.attn.") for f in unread), unread
