"""The wall time a user sees: `gradprobe lint MODEL` end to end, split into its phases.

Runs the CLI in a fresh process (as a user would), `--format json`, several times, and splits
each run's wall clock with the report's own timing:
  start-up  wall - total: interpreter start, imports (torch dominates), option parsing, writing
            the report
  load      reading and preparing the model file (report timing.load_s)
  probe     forward+backward with the statistics (timing.probe_s)
  rules     the rules over the measurements (timing.rules_s)
For reference, `import torch` alone is timed in a fresh process too.

Prints a table (medians), then one `LINTWALL {json}` line.

    python bench/lint_wall.py [MODEL] [--repeat 3] [-- extra lint flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRADPROBE = [sys.executable, "-m", "gradprobe"]


def timed_run(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: findings at or above --fail-on
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "examples" / "mlp_defects.onnx"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed on to lint")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]

    runs = []
    with tempfile.TemporaryDirectory(prefix="gradprobe-wall-") as tmp:
        out = Path(tmp) / "report.json"
        for _ in range(args.repeat):
            wall = timed_run([*GRADPROBE, "lint", args.model, "--format", "json", "-o", str(out),
                              "--fail-on", "never", *extra])
            timing = json.loads(out.read_text())["timing"]
            runs.append({"wall": wall, "load": timing["load_s"], "probe": timing["probe_s"],
                         "rules": timing["rules_s"], "startup": wall - timing["total_s"]})
    torch_import = statistics.median(timed_run([sys.executable, "-c", "import torch"])
                                     for _ in range(args.repeat))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"gradprobe lint {Path(args.model).name}, median of {args.repeat} fresh processes")
    print(f"{'phase':<10}{'seconds':>9}{'share':>8}")
    for key in ("startup", "load", "probe", "rules", "wall"):
        print(f"{key:<10}{med[key]:>9.3f}{med[key] / med['wall']:>8.0%}")
    print(f"(python -c 'import torch' alone: {torch_import:.3f} s)")
    print("LINTWALL " + json.dumps({"model": Path(args.model).name, "repeat": args.repeat,
                                    **{f"{k}_s": round(v, 4) for k, v in med.items()},
                                    "import_torch_s": round(torch_import, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
