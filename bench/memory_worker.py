"""Peak memory of one benchmark phase, measured in a fresh process and printed as one JSON line.

A fresh process per measurement keeps one phase's allocator caches out of another's figure.
The phase runs once to warm up (oneDNN primitives, TorchScript plans, lazily created buffers),
its gradients are freed, the peak counter is reset and the phase runs again:
- CPU: the growth of the resident set, VmHWM after minus VmRSS before (the kernel resets VmHWM
  when "5" is written to /proc/self/clear_refs). The parent starts this process with glibc's
  mmap threshold fixed, so freed tensors go back to the kernel and the resident set tracks the
  live tensors instead of whatever malloc keeps cached;
- CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the phase.

Usage (the harness calls it): memory_worker.py PHASE --device cpu --batch 8 [--path F --format onnx]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
from pathlib import Path

import torch
from phases import PHASES, Variant, drop_grads, load_variant, phase_runner, probe_batch, synchronize
from resnet18 import resnet18

# Passed by the parent in this process's environment (it must be set before malloc starts).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: CPU peak memory needs Linux")
    return int(match.group(1))


def _reset_cpu_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(run, device: torch.device) -> dict[str, float]:
    """Bytes: `base` in use before the phase, `peak` the growth above it during the phase."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return {"base": base, "peak": torch.cuda.max_memory_allocated(device) - base}
    _reset_cpu_peak()
    base = _status_kib("VmRSS")
    run()
    return {"base": base * 1024, "peak": (_status_kib("VmHWM") - base) * 1024}


def set_flush_mb(device: str, megabytes: int) -> None:
    """How many bytes of tapped values the probe lets pend before it measures them (see
    gradprobe.diagnostics.probe): the knob that trades launches against peak memory."""
    from gradprobe.diagnostics import probe

    probe._FLUSH_BYTES[torch.device(device).type] = megabytes << 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", type=Path, help="the exported model (plain and probe phases)")
    parser.add_argument("--format", choices=("onnx", "torchscript"))
    parser.add_argument("--zero-init-residual", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--flush-mb", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_mb:
        set_flush_mb(args.device, args.flush_mb)

    device = torch.device(args.device)
    inputs = probe_batch(args.batch, device, args.seed)
    model = module = None
    if args.phase == "module":
        module = resnet18(args.seed, args.zero_init_residual).to(device)
    else:
        model = load_variant(Variant("", args.format, "", args.path), device)
    run = phase_runner(args.phase, model=model, module=module, inputs=inputs, seed=args.seed)
    run()  # warm-up
    drop_grads(model, module)
    print(json.dumps(measure(run, device)))


if __name__ == "__main__":
    main()
