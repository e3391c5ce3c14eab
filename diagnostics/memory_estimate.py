"""Will a probe fit? A floor for its memory from what is known before running it, and an early,
clear refusal when that floor exceeds what the device has free.

The floor counts what the probe certainly holds beyond the loaded model: one gradient per
parameter, the probe's temporary copies (bounded by the statistics' chunk size), and the
batch held three times (the inputs, a layer's output, its gradient). Activations of a deep
network come on top — unknown until the graph runs — so a model that passes this check can
still run out of memory; one that fails it certainly would.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gradprobe.diagnostics.errors import ProbeError
from gradprobe.diagnostics.graph import LoadedModel

_TEMPORARY_BYTES = 64 << 20  # the statistics' pending values and copies (see probe.py)
_GIB = 1 << 30


class InsufficientMemory(ProbeError):
    """The probe would not fit in the memory the device has free."""


def probe_floor_bytes(model: LoadedModel, inputs: list[torch.Tensor]) -> int:
    """Bytes a probe of `model` on `inputs` certainly needs beyond the loaded model."""
    grads = sum(p.numel() * p.element_size() for p in model.parameters.values()
                if p.requires_grad and p.is_floating_point())
    batch = sum(t.numel() * t.element_size() for t in inputs)
    return grads + 3 * batch + _TEMPORARY_BYTES


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` now: CUDA's free memory, or the host's MemAvailable capped by a
    cgroup limit; None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    if match is None:
        return None
    free = int(match.group(1)) * 1024
    limit = _cgroup_room()
    return min(free, limit) if limit is not None else free


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if there is one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return max(int(limit) - int(used), 0)


def check_probe_fits(model: LoadedModel, inputs: list[torch.Tensor],
                     device: torch.device) -> None:
    """Raise InsufficientMemory, before any work, when the probe's floor exceeds free memory."""
    free = available_bytes(device)
    if free is None:
        return
    need = probe_floor_bytes(model, inputs)
    if need > free:
        params = sum(p.numel() for p in model.parameters.values())
        raise InsufficientMemory(
            f"the probe needs at least {need / _GIB:.1f} GiB beyond the loaded model "
            f"({params / 1e6:,.0f}M parameters' gradients and the probe batch) but {device} has "
            f"{free / _GIB:.1f} GiB free: use a smaller --batch-size or input shape, or a "
            "machine with more memory")
