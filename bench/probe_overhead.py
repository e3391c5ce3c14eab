"""How much the probe costs over a plain forward+backward of the same model.

For a ResNet-18 (torchvision's layout and init, 11.7M parameters) exported three ways — ONNX
with BatchNorm in training mode, ONNX in eval mode with BN folded into the convs, traced
TorchScript — the harness loads each file with gradprobe's loaders and measures, in one process
and interleaved so that a change in machine load hits every phase alike:
  plain   forward+backward of the loaded model as the probe runs it, no taps (the baseline)
  probe   gradprobe.diagnostics.probe.probe() on the same model and batch
  module  the original nn.Module forward+backward in train mode (reference only)
Time ratio = median over repetitions of probe/plain, each pair taken back to back; the eager
ratio is probe/module, paired within a repetition the same way. Peak memory is measured per
phase in a fresh process (memory_worker.py): growth above the loaded model (or module).

Targets (issue 15), judged against eager PyTorch: probe time <= 1.2x the module's
forward+backward and peak memory <= 1.3x its peak (on CUDA, time <= 1.1x). Against the
loaded model's own plain step the older target stays in the table: 1.5 (CPU) / 1.2 (CUDA).

Prints a table, then one `BENCH {json}` line per row. Exit status 0, or with --check 1 when an
eager-relative ratio misses its target.

    python bench/probe_overhead.py [--device cpu|cuda|auto] [--batch 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from memory_worker import MALLOC_ENV, set_flush_mb
from phases import (
    VARIANTS,
    Variant,
    drop_grads,
    export_variant,
    load_variant,
    phase_runner,
    probe_batch,
    synchronize,
)
from resnet18 import resnet18

TARGETS = {"cpu": 1.5, "cuda": 1.2}  # probe / plain step of the same loaded model
EAGER_TIME_TARGETS = {"cpu": 1.2, "cuda": 1.1}  # probe / eager nn.Module step
EAGER_MEMORY_TARGET = 1.3
MB = 1024 * 1024


@dataclass
class Row:
    model: str
    variant: str
    format: str
    export: str
    device: str
    batch: int
    repeat: int
    module_ms: float
    plain_ms: float
    probe_ms: float
    time_ratio: float  # wall clock: what is judged against the target
    cpu_time_ratio: float  # process CPU time, the steadier figure on a shared machine
    plain_peak_mb: float | None
    probe_peak_mb: float | None
    memory_ratio: float | None
    target: float
    module_peak_mb: float | None
    eager_time_ratio: float  # probe / module, wall clock, paired within a repetition
    eager_cpu_time_ratio: float
    eager_memory_ratio: float | None
    eager_time_target: float
    eager_memory_target: float
    passed: bool  # the eager-relative targets


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available on this machine")
    return torch.device(requested)


def timed(run, device: torch.device) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) for one call. On a shared
    machine the CPU time is the steadier of the two: other processes stretch the wall clock."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_times(variants: list[Variant], module, inputs, device: torch.device, warmup: int,
                  repeat: int, seed: int) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """(wall, cpu) seconds per phase per variant; every repetition runs every phase once, in
    turn."""
    models = {v.key: load_variant(v, device) for v in variants}
    runs = {"module": phase_runner("module", module=module, inputs=inputs, seed=seed)}
    for key, model in models.items():
        for phase in ("plain", "probe"):
            runs[f"{key}/{phase}"] = phase_runner(phase, model=model, inputs=inputs, seed=seed)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for i in range(warmup + repeat):
        for name, run in runs.items():
            seconds = timed(run, device)
            if i >= warmup:
                times[name].append(seconds)
        for model in models.values():
            drop_grads(model, None)
        drop_grads(None, module)
        print(f"  repetition {i + 1}/{warmup + repeat}"
              f"{' (warm-up)' if i < warmup else ''}: "
              + ", ".join(f"{n} {t[-1][0] * 1e3:.0f} ms"
                          for n, t in times.items() if t and i >= warmup),
              file=sys.stderr, flush=True)
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for v in variants:
        out[v.key] = {"module": times["module"], "plain": times[f"{v.key}/plain"],
                      "probe": times[f"{v.key}/probe"]}
    return out


def measure_peak(phase: str, variant: Variant | None, device: torch.device,
                 args: argparse.Namespace) -> float:
    """Peak bytes above the loaded model for one phase, from a fresh process."""
    cmd = [sys.executable, str(Path(__file__).with_name("memory_worker.py")), phase,
           "--device", device.type, "--batch", str(args.batch), "--seed", str(args.seed)]
    if variant is not None:
        cmd += ["--path", str(variant.path), "--format", variant.format]
    if args.zero_init_residual:
        cmd.append("--zero-init-residual")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.flush_mb:
        cmd += ["--flush-mb", str(args.flush_mb)]
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {phase} failed:\n{done.stderr.strip()}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak"])


def _paired_ratio(times: dict[str, list[tuple[float, float]]], clock: int,
                  baseline: str = "plain") -> float:
    """Median of probe/baseline over repetitions, each probe call against the baseline call
    of the same repetition (a load change between repetitions cancels out)."""
    pairs = zip(times[baseline], times["probe"], strict=True)
    return statistics.median(probe[clock] / plain[clock] for plain, probe in pairs)


def _median_ms(samples: list[tuple[float, float]]) -> float:
    return statistics.median(wall for wall, _ in samples) * 1e3


def print_table(rows: list[Row]) -> None:
    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = ("model", "format", "export", "device", "module ms", "plain ms", "probe ms",
              "time x", "cpu x", "eager x", "eager cpu x", "module MB", "plain MB", "probe MB",
              "mem x", "eager mem x", "eager target", "result")
    lines = [header] + [
        (r.model, r.format, r.export, r.device, f"{r.module_ms:.0f}", f"{r.plain_ms:.0f}",
         f"{r.probe_ms:.0f}", ratio(r.time_ratio), ratio(r.cpu_time_ratio),
         ratio(r.eager_time_ratio), ratio(r.eager_cpu_time_ratio), mb(r.module_peak_mb),
         mb(r.plain_peak_mb), mb(r.probe_peak_mb), ratio(r.memory_ratio),
         ratio(r.eager_memory_ratio),
         f"{r.eager_time_target}/{r.eager_memory_target}", "PASS" if r.passed else "FAIL")
        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--batch", type=int, default=8, help="probe batch size (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions (default 3)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--zero-init-residual", action="store_true",
                        help="zero each block's last BN scale: the probe then makes two passes")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice); 1 gives steady "
                             "figures on a machine shared with other work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flush-mb", type=int, default=None,
                        help="the probe's batch of pending values on this device, in MiB "
                             "(default: the probe's own choice)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_mb:
        set_flush_mb(device.type, args.flush_mb)
    module = resnet18(args.seed, args.zero_init_residual)
    model_name = "resnet18" + ("-zero-res" if args.zero_init_residual else "")
    inputs = probe_batch(args.batch, device, args.seed)
    print(f"{model_name}, batch {args.batch}x3x224x224, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.repeat} timed "
          "repetitions", file=sys.stderr)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gradprobe-bench-") as tmp:
        variants = [export_variant(module, key, Path(tmp), args.batch) for key in args.variants]
        module.to(device)
        times = measure_times(variants, module, inputs, device, args.warmup, args.repeat, args.seed)
        del module
        module_peak = None
        if not args.no_memory:
            print("  peak memory: module", file=sys.stderr, flush=True)
            module_peak = measure_peak("module", None, device, args) / MB
        for v in variants:
            t = times[v.key]
            plain_peak = probe_peak = None
            if not args.no_memory:
                print(f"  peak memory: {v.key}", file=sys.stderr, flush=True)
                plain_peak = measure_peak("plain", v, device, args) / MB
                probe_peak = measure_peak("probe", v, device, args) / MB
            time_ratio, cpu_ratio = _paired_ratio(t, clock=0), _paired_ratio(t, clock=1)
            memory_ratio = probe_peak / plain_peak if plain_peak else None
            target = TARGETS[device.type]
            eager_time = _paired_ratio(t, clock=0, baseline="module")
            eager_cpu = _paired_ratio(t, clock=1, baseline="module")
            eager_memory = probe_peak / module_peak if module_peak and probe_peak else None
            time_target = EAGER_TIME_TARGETS[device.type]
            passed = eager_time <= time_target and (eager_memory is None
                                                     or eager_memory <= EAGER_MEMORY_TARGET)
            rows.append(Row(model_name, v.key, v.format, v.export, device.type, args.batch,
                            args.repeat, _median_ms(t["module"]), _median_ms(t["plain"]),
                            _median_ms(t["probe"]), time_ratio, cpu_ratio, plain_peak,
                            probe_peak, memory_ratio, target, module_peak, eager_time,
                            eager_cpu, eager_memory, time_target, EAGER_MEMORY_TARGET, passed))
    print_table(rows)
    for row in rows:
        print("BENCH " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                     for k, v in asdict(row).items()}))
    return 1 if args.check and not all(r.passed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
