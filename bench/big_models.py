"""Probe cost on big models from the real libraries, against their own eager step.

    python bench/big_models.py                                 # the four, ONNX + TorchScript
    python bench/big_models.py --models gpt2 --formats torchscript
    python bench/big_models.py --models decoder-1b --formats torchscript

Models (default init, nothing downloaded): torchvision ResNet-50 and ViT-B/16 (batch 2, 224 px),
transformers BERT-base and GPT-2 small (batch 2, 128 tokens), and a 1.1B-parameter Llama-style
decoder built from a config (batch 1, 128 tokens; TorchScript, as its ONNX would need external
data of 4.4 GB). Each is exported the usual way (ONNX legacy exporter in eval mode, traced
TorchScript) into a temp folder.

Each measurement runs in a fresh process (this script with --worker): it builds or loads the
model, runs the phase once to warm up (not for the 1B decoder, whose step takes minutes here),
then times one more run and records the growth of the resident set during it (VmHWM after
minus VmRSS before). Phases: `eager` — the module's forward+backward in train mode on the same
batch; `probe` — gradprobe's probe (every tap and statistic) of the exported file; `lint` —
`gradprobe lint` as a user runs it, wall time from start to exit, with its load, probe and
rules split.

Prints a markdown table, then one `BIG {json}` line per row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from memory_worker import MALLOC_ENV, _reset_cpu_peak, _status_kib, measure
from phases import synchronize

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    # name: (kind, batch, sequence length or image size)
    "resnet50": ("image", 2, 224),
    "vit_b_16": ("image", 2, 224),
    "bert-base": ("text", 2, 128),
    "gpt2": ("text", 2, 128),
    "decoder-1b": ("text", 1, 128),
}
BIG_WITHOUT_WARMUP = {"decoder-1b"}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in ("resnet50", "vit_b_16"):
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    import transformers

    if name == "bert-base":
        return _LastHidden(transformers.BertModel(transformers.BertConfig()))
    if name == "gpt2":
        return _Logits(transformers.GPT2LMHeadModel(transformers.GPT2Config()))
    config = transformers.LlamaConfig(  # TinyLlama's shape: 1.1B parameters
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    return _Logits(transformers.LlamaForCausalLM(config))


class _LastHidden(torch.nn.Module):
    """The encoder's last hidden state as one tensor (what an exporter sees)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=ids).last_hidden_state


class _Logits(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=ids, use_cache=False).logits


def example(name: str) -> torch.Tensor:
    kind, batch, size = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    if kind == "image":
        return torch.randn(batch, 3, size, size, generator=gen)
    return torch.randint(0, 1000, (batch, size), generator=gen)


def input_spec(name: str) -> tuple[list[int], str]:
    """The shape and dtype a user gives `gradprobe lint` (TorchScript declares none)."""
    value = example(name)
    return list(value.shape), "int64" if value.dtype == torch.int64 else "float32"


def export(module: torch.nn.Module, name: str, fmt: str, folder: Path) -> Path:
    module.eval()
    inputs = (example(name),)
    # Not under no_grad: torchvision's attention would take its inference-only fast path
    # (aten::_native_multi_head_attention), which no exporter and no training step sees.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            path = folder / f"{name}.onnx"
            try:
                torch.onnx.export(module, inputs, str(path), dynamo=False,
                                  input_names=["input"], output_names=["output"])
            except Exception as exc:  # noqa: BLE001 - e.g. transformers 5's masks (aten::diff)
                print(f"{name}: the legacy ONNX exporter failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]}); exporting with dynamo=True",
                      file=sys.stderr, flush=True)
                torch.onnx.export(module, inputs, str(path), dynamo=True, verbose=False)
        else:
            path = folder / f"{name}.pt"
            torch.jit.save(torch.jit.trace(module, inputs, check_trace=False), str(path))
    return path


# --- the worker: one phase in a fresh process ------------------------------------------------

def _drop_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def _measured(run, params, warmup: bool) -> dict[str, float]:  # noqa: ANN001
    if warmup:
        run()
        _drop_grads(params)  # the warm-up's gradients would count as already there
    gc.collect()
    _reset_cpu_peak()
    base = _status_kib("VmRSS")
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_mb": (_status_kib("VmHWM") - base) / 1024,
            "base_mb": base / 1024}


def _eager_step(name: str, device: torch.device | None = None,
                module: torch.nn.Module | None = None):  # noqa: ANN202 - a callable
    device = device or torch.device("cpu")
    module = (module if module is not None else build(name)).to(device).train()
    ids = example(name).to(device)
    cotangent = None

    def run() -> None:
        nonlocal cotangent
        for p in module.parameters():
            p.grad = None
        out = module(ids)
        if cotangent is None:  # drawn once on the CPU, as the probe draws its own
            gen = torch.Generator().manual_seed(1)
            cotangent = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
        out.backward(cotangent)
    run.params = list(module.parameters())
    return run


def _probe_step(name: str, path: Path, fmt: str,
                device: torch.device | None = None):  # noqa: ANN202 - a callable
    from gradprobe.diagnostics.inputs import synthetic_inputs
    from gradprobe.diagnostics.loaders import load_model
    from gradprobe.diagnostics.options import DiagnoseOptions
    from gradprobe.diagnostics.probe import probe

    device = device or torch.device("cpu")
    model = load_model(path, fmt).to(device)
    shape, dtype = input_spec(name)
    options = DiagnoseOptions(seed=0, input_shapes=[shape], input_dtypes=[dtype])
    inputs, _ = synthetic_inputs(model.inputs, options, device)

    def run() -> None:
        for p in model.parameters.values():
            p.grad = None
        probe(model, inputs, 0)
    run.params = list(model.parameters.values())
    return run


def worker(phase: str, name: str, path: Path | None, fmt: str | None,
           rounds: int) -> dict[str, float]:
    """`eager`/`probe`: peak memory of one step. `time`: both steps in this process,
    alternating, so that a change of the machine's load hits both alike; the ratio is the
    median of the per-round ratios."""
    warmup = name not in BIG_WITHOUT_WARMUP
    if phase in ("eager", "probe"):
        step = _eager_step(name) if phase == "eager" else _probe_step(name, path, fmt)
        return _measured(step, step.params, warmup)
    eager, probed = _eager_step(name), _probe_step(name, path, fmt)
    if warmup:
        eager()
        probed()
    return _paired_times(eager, probed, rounds, torch.device("cpu"))


def _paired_times(eager, probed, rounds: int,  # noqa: ANN001 - zero-argument callables
                  device: torch.device) -> dict[str, float]:
    """Both steps in turn, `rounds` times (the device synchronised around each): medians of
    each step and of the per-round ratio, so a change of the machine's load hits both alike."""
    pairs = []
    for _ in range(rounds):
        times = []
        for step in (eager, probed):
            gc.collect()
            synchronize(device)
            began = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - began)
        pairs.append(times)
    return {"eager_s": statistics.median(t[0] for t in pairs),
            "probe_s": statistics.median(t[1] for t in pairs),
            "time_ratio": statistics.median(t[1] / t[0] for t in pairs)}


def on_cuda(name: str, module: torch.nn.Module, path: Path, fmt: str, rounds: int,
            device: torch.device) -> dict[str, float]:
    """Time and peak memory of the eager step and the probe on the GPU, in this process:
    device time by synchronising around each step (paired rounds, median ratio), memory as
    the growth of PyTorch's allocated bytes above what was resident before the step."""
    eager, probed = _eager_step(name, device, module), _probe_step(name, path, fmt, device)
    for step in (eager, probed, eager, probed):  # warm-up: kernels, cuBLAS/cuDNN handles
        step()
    timed = _paired_times(eager, probed, rounds, device)
    peaks = {}
    for key, step in (("eager", eager), ("probe", probed)):
        _drop_grads(eager.params + probed.params)
        peaks[f"{key}_peak_mb"] = measure(step, device)["peak"] / 2**20
    _drop_grads(eager.params + probed.params)
    return {**timed, **peaks}


def in_fresh_process(args: list[str], *, for_memory: bool, rounds: int = 1) -> dict[str, float]:
    """One measurement in a new process. For memory, glibc returns freed blocks to the kernel
    at once, so the resident set tracks live tensors (that makes allocations slow: time is
    measured without it)."""
    env = dict(os.environ)
    if for_memory:
        env.update(MALLOC_ENV)
    done = subprocess.run([sys.executable, __file__, "--rounds", str(rounds), "--worker", *args],
                          capture_output=True, text=True, env=env, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def lint_wall(name: str, path: Path, device: str = "cpu") -> dict[str, float]:
    """`gradprobe lint` as a user runs it: wall time, the report's split, and the process's
    peak resident set (what has to fit in the machine)."""
    shape, dtype = input_spec(name)
    began = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gradprobe", "lint", str(path), "--input-shape",
             "x".join(map(str, shape)), "--input-dtype", dtype, "--format", "json",
             "--fail-on", "never", "--device", device], stdout=out, stderr=err,
            cwd=path.parent)  # not the checkout: its gradprobe/ would shadow the installed one
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    peak = {"max_rss_mb": usage.ru_maxrss / 1024}  # Linux: kilobytes
    if process.returncode != 0:
        return {"wall_s": wall, **peak, "error": stderr.strip()[-300:]}
    report = json.loads(stdout)
    timing = report["timing"]
    return {"wall_s": wall, **peak, "load_s": timing["load_s"], "probe_s": timing["probe_s"],
            "rules_s": timing["rules_s"],
            "findings": sum(report["summary"][k] for k in ("error", "warning"))}


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16", "bert-base",
                                                         "gpt2"], choices=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=["onnx", "torchscript"],
                        choices=["onnx", "torchscript"])
    parser.add_argument("--rounds", type=int, default=3, help="paired eager/probe timings")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every measurement in this process, on the GPU")
    parser.add_argument("--lint", nargs="*", default=None, choices=list(MODELS), metavar="MODEL",
                        help="models to time `gradprobe lint` on (default: every one; none: "
                             "`--lint` alone)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        phase, name, *rest = args.worker
        path = Path(rest[0]) if rest else None
        print(json.dumps(worker(phase, name, path, rest[1] if rest else None, args.rounds)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="gradprobe-big-") as tmp:
        for name in args.models:
            module = build(name)
            params = sum(p.numel() for p in module.parameters()) / 1e6
            files = {fmt: export(module, name, fmt, Path(tmp)) for fmt in args.formats}
            if args.device == "cuda":
                measured = {fmt: on_cuda(name, module, path, fmt, args.rounds,
                                         torch.device("cuda"))
                            for fmt, path in files.items()}
            del module
            gc.collect()
            if args.device == "cpu":
                eager_memory = in_fresh_process(["eager", name], for_memory=True)
                measured = {}
                for fmt, path in files.items():
                    timed = in_fresh_process(["time", name, str(path), fmt], for_memory=False,
                                             rounds=args.rounds)
                    probe_memory = in_fresh_process(["probe", name, str(path), fmt],
                                                    for_memory=True)
                    measured[fmt] = {**timed, "eager_peak_mb": eager_memory["peak_mb"],
                                     "probe_peak_mb": probe_memory["peak_mb"]}
            else:
                torch.cuda.empty_cache()
            for fmt, path in files.items():
                m = measured[fmt]
                linted = args.lint is None or name in args.lint
                wall = lint_wall(name, path, args.device) if linted else {}
                row = {"model": name, "params_m": round(params, 1), "format": fmt,
                       "device": args.device, "file_mb": round(path.stat().st_size / 2**20), **m,
                       "memory_ratio": m["probe_peak_mb"] / max(m["eager_peak_mb"], 1),
                       **{f"lint_{k}": v for k, v in wall.items()}}
                rows.append(row)
                print(f"BIG {json.dumps(row)}", flush=True)
    print()
    print("| model | params | format | eager step | probe | time ratio | eager peak | "
          "probe peak | memory ratio | `gradprobe lint` wall (load / probe / rules) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lint = (f"{r['lint_wall_s']:.1f} s ({r.get('lint_load_s', 0):.1f} / "
                f"{r.get('lint_probe_s', 0):.1f} / {r.get('lint_rules_s', 0):.1f}), "
                f"peak RSS {r['lint_max_rss_mb'] / 1024:.1f} GB"
                if "lint_wall_s" in r and "lint_error" not in r
                else f"error: {r['lint_error']}" if "lint_error" in r else "-")
        print(f"| {r['model']} | {r['params_m']}M | {r['format']} | {_seconds(r['eager_s'])} | "
              f"{_seconds(r['probe_s'])} | {r['time_ratio']:.2f}x | {r['eager_peak_mb']:.0f} MB | "
              f"{r['probe_peak_mb']:.0f} MB | {r['memory_ratio']:.2f}x | {lint} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
