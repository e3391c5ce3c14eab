"""Throughput of 1, 2 and 3 gradprobe replicas, and the speed-up of a folder fanned out over them.

    python bench/scale_out.py                       # 1/2/3 replicas, 32 clients x 30 s each
    python bench/scale_out.py --clients 8 --duration 10 --files 20

Part 1: `--clients` threads send jobs (small ONNX MLPs, every answer checked against the local
engine) for `--duration` seconds to 1, then 2, then 3 replicas (one worker each) through the
client's round robin; jobs per second and the ratio to one replica.
Part 2: `gradprobe lint DIR --server ... --jobs N` on `--files` small models, with fresh
replicas (every model is uploaded on its first job), against one replica and one job at a time.

Each replica's worker uses all cores, so on a machine with fewer cores than replicas the ratio
is bounded by the cores, not by gradprobe: the table prints the core count beside it.

Prints a table for people and one line for scripts:
    SCALEOUT cores=... r1=...jobs/s r2=...x r3=...x fanout_files=... fanout_speedup=...x
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # replicas.py and zoo.py: the test suite's fleet

from replicas import (  # noqa: E402
    expected_findings,
    make_models,
    run_load,
    start_replicas,
    stop_replicas,
    wait_serving,
)


def throughput(root: Path, count: int, models: list[Path], expected: dict, clients: int,
               duration_s: float) -> tuple[float, dict]:
    replicas = start_replicas(count, root / f"tp{count}")
    try:
        target = ",".join(r.address for r in replicas)
        wait_serving(target)
        # every replica gets every model once, so the timed run measures probes, not uploads
        run_load(target, models, expected, clients=count * len(models), duration_s=0.1)
        result = run_load(target, models, expected, clients=clients, duration_s=duration_s)
        print(f"/metrics of {replicas[0].name} after the {count}-replica run (buckets and "
              "timestamps left out):")
        for line in replicas[0].metrics_text().splitlines():
            if line.startswith("gradprobe_") and "_bucket" not in line \
                    and "_created" not in line:
                print("   ", line)
    finally:
        stop_replicas(replicas)
    if result.lost or result.mismatched:
        raise SystemExit(f"{count} replica(s): lost {result.lost[:3]} "
                         f"mismatched {result.mismatched[:3]}")
    return result.per_second, dict(result.by_replica)


def fan_out(root: Path, folder: Path, count: int, jobs: int) -> float:
    """Seconds for `gradprobe lint folder --server <count replicas> --jobs jobs` (cold stores)."""
    replicas = start_replicas(count, root / f"fan{count}-{jobs}")
    try:
        target = ",".join(r.address for r in replicas)
        wait_serving(target)
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "gradprobe.client.cli", "lint", str(folder), "--server",
             target, "--jobs", str(jobs), "--seed", "0", "--format", "json", "--output",
             str(root / f"fan{count}.json")],
            capture_output=True, text=True, timeout=3600)
        elapsed = time.perf_counter() - began
    finally:
        stop_replicas(replicas)
    if done.returncode not in (0, 1):  # 1: findings (half the models carry a planted defect)
        raise SystemExit(f"lint --server failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per replica count")
    parser.add_argument("--files", type=int, default=100, help="models in the fanned-out folder")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gradprobe-scale-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models", count=4)
        expected = expected_findings(models)
        rates = {}
        for count in args.replicas:
            rates[count], spread = throughput(root, count, models, expected, args.clients,
                                              args.duration)
            print(f"{count} replica(s): {rates[count]:.2f} jobs/s, jobs per replica {spread}",
                  flush=True)
        folder = root / "folder"
        make_models(folder, count=args.files)
        most = max(args.replicas)
        one = fan_out(root, folder, 1, 1)
        many = fan_out(root, folder, most, 2 * most)
        print(f"lint of {args.files} files: {one:.1f} s on 1 replica (--jobs 1), {many:.1f} s "
              f"on {most} (--jobs {2 * most})", flush=True)

    base = rates[args.replicas[0]]
    print()
    print(f"cores: {os.cpu_count()}  clients: {args.clients}  duration: {args.duration:g} s")
    print("| replicas | jobs/s | ratio to 1 |")
    print("|---|---|---|")
    for count, rate in rates.items():
        print(f"| {count} | {rate:.2f} | {rate / base:.2f}x |")
    print(f"| folder of {args.files}: 1 replica --jobs 1 | {one:.1f} s | |")
    print(f"| folder of {args.files}: {most} replicas --jobs {2 * most} | {many:.1f} s | "
          f"{one / many:.2f}x |")
    ratios = " ".join(f"r{c}={rate / base:.2f}x" for c, rate in rates.items() if c != 1)
    print(f"SCALEOUT cores={os.cpu_count()} r1={base:.2f}jobs/s {ratios} "
          f"fanout_files={args.files} fanout_speedup={one / many:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
