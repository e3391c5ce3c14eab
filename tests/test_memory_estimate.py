"""The early memory refusal: a floor from the parameters and the batch, against free memory."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradprobe.diagnostics.errors import ProbeError
from gradprobe.diagnostics.loaders.onnx_loader import load_onnx
from gradprobe.diagnostics.memory_estimate import (
    InsufficientMemory,
    available_bytes,
    check_probe_fits,
    probe_floor_bytes,
)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(50, 20), (torch.randn(2, 50),), str(path),
                          dynamo=False, input_names=["x"])
    return load_onnx(path)


def test_floor_counts_gradients_and_the_batch_three_times(model):
    params = (50 * 20 + 20) * 4
    batch = [torch.zeros(2, 50)]
    empty = probe_floor_bytes(model, [])
    assert probe_floor_bytes(model, batch) - empty == 3 * 100 * 4
    model.parameters = {}
    assert empty - probe_floor_bytes(model, []) == params


def test_a_probe_that_cannot_fit_is_refused_with_a_clear_message(model):
    # 16 TiB of parameters on the meta device: never allocated, certainly not free here
    model.parameters["huge"] = torch.nn.Parameter(torch.empty(1 << 42, device="meta"))
    with pytest.raises(InsufficientMemory) as err:
        check_probe_fits(model, [torch.zeros(2, 50)], torch.device("cpu"))
    assert isinstance(err.value, ProbeError)
    assert "GiB free" in str(err.value) and "--batch-size" in str(err.value)


def test_this_machine_reports_free_memory_and_a_small_probe_fits(model):
    free = available_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    check_probe_fits(model, [torch.zeros(2, 50)], torch.device("cpu"))
