"""How many aten operations the probe dispatches against an eager forward+backward: the GPU proxy.

On a GPU a ResNet-18 step at a small batch takes a few milliseconds and each small statistics
kernel costs a launch of a few microseconds, so the number of dispatched operations, not the
bytes they touch, sets the probe's GPU overhead. This counts them deterministically on the CPU
with a `TorchDispatchMode` (every aten call made by forward, backward and the statistics; views
and metadata-only calls included, as the dispatcher sees them).

Phases, per exported variant (see phases.py): `module` (the eager nn.Module forward+backward in
train mode, the reference), `plain` (the loaded model's own forward+backward) and `probe`.
Ratio = probe ops / module ops; target <= 1.5. The probe batches its statistics by bytes, with
a small batch on a CPU (memory) and a large one on a GPU (launches); `probe ops` counts the
CPU setting (statistics one tensor at a time), `gpu-batched` the same probe with the GPU's
batch size and multi-tensor kernels — what a GPU launches, and
what the target is judged on. "Kernel ops" leave out views, aliases and bare
allocations (marked '*' in the listing), which launch nothing on a GPU.

Prints a table, then one `OPS {json}` line per variant.

    python bench/op_count.py [--batch 2] [--variants onnx-train onnx-eval torchscript] [--top 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from phases import VARIANTS, drop_grads, export_variant, load_variant, phase_runner, probe_batch
from resnet18 import resnet18
from torch.utils._python_dispatch import TorchDispatchMode

from gradprobe.diagnostics import probe as probe_module

TARGET = 1.5


# Operations that launch no kernel on a GPU: views and aliases (metadata only) and bare
# allocations. Counted, but listed apart as "kernel ops" leave them out.
NO_KERNEL = {"detach", "lift_fresh", "alias", "empty", "new_empty", "empty_like", "empty_strided"}


def is_kernel(name: str, is_view: bool) -> bool:
    return not is_view and name not in NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts every aten operation that reaches the dispatcher's Python mode, by name (views
    are marked with a trailing '*' so that kernel launches can be told apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops[name if is_kernel(name, func.is_view) else name + "*"] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run) -> Counter[str]:
    """Aten operations of one call of `run`, after one uncounted warm-up call."""
    run()
    counter = OpCounter()
    with counter:
        run()
    return counter.ops


def kernels(ops: Counter[str]) -> int:
    return sum(n for name, n in ops.items() if not name.endswith("*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--top", type=int, default=8, help="most frequent ops listed per probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio misses 1.5")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    device = torch.device("cpu")
    module = resnet18(args.seed)
    inputs = probe_batch(args.batch, device, args.seed)
    module_ops = count_ops(phase_runner("module", module=module, inputs=inputs, seed=args.seed))
    drop_grads(None, module)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradprobe-ops-") as tmp:
        for key in args.variants:
            variant = export_variant(module, key, Path(tmp), args.batch)
            model = load_variant(variant, device)
            plain = count_ops(phase_runner("plain", model=model, inputs=inputs, seed=args.seed))
            drop_grads(model, None)
            probe = count_ops(phase_runner("probe", model=model, inputs=inputs, seed=args.seed))
            drop_grads(model, None)
            # The GPU's settings on this CPU: its statistics batch and multi-tensor kernels.
            budgets, per_tensor = probe_module._FLUSH_BYTES, probe_module._PER_TENSOR
            saved = budgets["cpu"], per_tensor.get("cpu", False)
            budgets["cpu"] = budgets["cuda"]
            per_tensor["cpu"] = per_tensor.get("cuda", False)
            try:
                gpu_batched = count_ops(phase_runner("probe", model=model, inputs=inputs,
                                                     seed=args.seed))
            finally:
                budgets["cpu"], per_tensor["cpu"] = saved
            drop_grads(model, None)
            module_total, plain_total, probe_total = (sum(c.values()) for c in
                                                      (module_ops, plain, probe))
            module_k, plain_k, probe_k = (kernels(c) for c in (module_ops, plain, probe))
            rows.append({
                "model": "resnet18", "variant": key, "batch": args.batch,
                "module_ops": module_total, "plain_ops": plain_total, "probe_ops": probe_total,
                "ratio_to_module": round(probe_total / module_total, 3),
                "ratio_to_plain": round(probe_total / plain_total, 3),
                "module_kernel_ops": module_k, "plain_kernel_ops": plain_k,
                "probe_kernel_ops": probe_k, "kernel_ratio_to_module": round(probe_k / module_k, 3),
                "gpu_batched_ops": sum(gpu_batched.values()),
                "gpu_batched_kernel_ops": kernels(gpu_batched),
                "gpu_batched_ratio": round(sum(gpu_batched.values()) / module_total, 3),
                "gpu_batched_kernel_ratio": round(kernels(gpu_batched) / module_k, 3),
                # judged as a GPU runs it: the proxy is for launches
                "passed": sum(gpu_batched.values()) / module_total <= TARGET,
                "probe_top": dict((probe - plain).most_common(args.top)),
            })

    header = ("variant", "module ops", "plain ops", "probe ops", "probe/module", "probe/plain",
              "kernel ops m/p", "kernel x", "gpu-batched ops (kernel)", "gpu-batched x (kernel)",
              "target", "result")
    lines = [header] + [(r["variant"], str(r["module_ops"]), str(r["plain_ops"]),
                         str(r["probe_ops"]), f"{r['ratio_to_module']:.2f}",
                         f"{r['ratio_to_plain']:.2f}",
                         f"{r['module_kernel_ops']}/{r['probe_kernel_ops']}",
                         f"{r['kernel_ratio_to_module']:.2f}",
                         f"{r['gpu_batched_ops']} ({r['gpu_batched_kernel_ops']})",
                         f"{r['gpu_batched_ratio']:.2f} ({r['gpu_batched_kernel_ratio']:.2f})",
                         f"<= {TARGET}",
                         "PASS" if r["passed"] else "FAIL") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"resnet18, batch {args.batch}x3x224x224, aten ops per forward+backward "
          f"(TorchDispatchMode, CPU, torch {torch.__version__})")
    for n, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        extra = ", ".join(f"{op} {n:+d}" for op, n in r["probe_top"].items())
        print(f"  {r['variant']}: probe minus plain, most frequent: {extra}")
    for r in rows:
        print("OPS " + json.dumps(r))
    return 1 if args.check and not all(r["passed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
