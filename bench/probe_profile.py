"""Where the probe's time goes on a device: torch.profiler over one plain step and one probe.

For the benchmark's ResNet-18 (or any exported variant of it, see phases.py), after warm-up,
profiles one `plain` and one `probe` phase and prints, per phase: wall time, host (CPU) time
spent in Python and in operators, the number of device kernels launched and of host-device
synchronisations (a `.item()`, `.tolist()` or `.cpu()` waits for the device), then the
operators with the most self time on the host and on the device. On a GPU at a small batch the
kernels are short and the host's work between launches sets the step time; this says which.

    python bench/probe_profile.py --device cuda [--variant torchscript] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from phases import VARIANTS, export_variant, load_variant, phase_runner, probe_batch, synchronize
from resnet18 import resnet18
from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "cudaMemcpy")  # cudaMemcpyAsync to pageable host memory also waits
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profiled(run, device: torch.device) -> tuple[float, object]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        synchronize(device)
        began = time.perf_counter()
        run()
        synchronize(device)
        wall = time.perf_counter() - began
    return wall, prof


def summary(name: str, wall: float, prof, device: torch.device, top: int) -> None:  # noqa: ANN001
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_EVENTS)
    syncs = sum(e.count for e in events if e.key.startswith(SYNC_EVENTS))
    device_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"\n## {name}: wall {wall * 1e3:.1f} ms, aten ops {aten}, kernel launches {launches}, "
          f"host-device syncs {syncs}, device busy {device_us / 1e3:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=top,
                           max_name_column_width=48))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="torchscript")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available on this machine")
    module = resnet18(0, False)
    inputs = probe_batch(args.batch, device, 0)
    with tempfile.TemporaryDirectory(prefix="gradprobe-profile-") as tmp:
        variant = export_variant(module, args.variant, Path(tmp), args.batch)
        model = load_variant(variant, device)
        module.to(device)
        runs = {"module": phase_runner("module", module=module, inputs=inputs),
                "plain": phase_runner("plain", model=model, inputs=inputs),
                "probe": phase_runner("probe", model=model, inputs=inputs)}
        for _ in range(3):
            for run in runs.values():
                run()
        print(f"resnet18 {args.variant}, batch {args.batch}, {device}, torch {torch.__version__}")
        for name, run in runs.items():
            wall, prof = profiled(run, device)
            summary(name, wall, prof, device, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
