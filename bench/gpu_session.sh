#!/usr/bin/env bash
# Every GPU check of the project in one command, for a lent GPU machine (the `device` tool)
# whose Python already has torch, onnx, onnxruntime, torchvision, timm and transformers.
# Run from the repository root. The wheels in .whl/ (pydantic and its needs) are installed into
# /tmp/site; gradprobe itself is built from this tree. Each step has its own time limit, so a
# failing step costs its limit and the next one still runs; logs and tables go to $OUT.
#
#   bash bench/gpu_session.sh [STEP...]
#   steps: env tests overhead big parity decoder (the default), profile overhead64 resnet50
set -u
OUT=${OUT:-/tmp/gradprobe-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
ROOT=$(pwd)
steps=${*:-env tests overhead big parity decoder}

began=$(date +%s)
step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo "=== $name (limit ${limit}s, at +$((t0 - began))s)"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
    return $rc
}

rm -rf /tmp/site
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls .whl/*.whl | grep -v gradprobe-) || exit 1
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --target /tmp/site . >"$OUT/install.log" 2>&1; then
    echo "building gradprobe from the tree failed (see install.log); using the carried wheel"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gradprobe-*.whl \
        || exit 1
fi
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH

for s in $steps; do case $s in
env)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.log"
    (cd /tmp && $PY -c "import torch, onnx, onnxruntime, torchvision, timm, transformers, pydantic, gradprobe
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('onnx', onnx.__version__, 'ort', onnxruntime.__version__, 'tv', torchvision.__version__,
      'timm', timm.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)
print('cudnn tf32', torch.backends.cudnn.allow_tf32, 'matmul tf32', torch.backends.cuda.matmul.allow_tf32)" \
        2>&1 | tee -a "$OUT/env.log")
    # `python -m` puts the working directory first on the path: run the installed gradprobe
    # from elsewhere, or the checkout's gradprobe/ (which is not the whole package) shadows it.
    (cd /tmp && $PY -m gradprobe lint "$ROOT/examples/mlp_defects.onnx" --device auto \
        --format json >"$OUT/lint_example.json" 2>"$OUT/lint_example.err")
    echo "lint example on auto: exit $? (1 = findings at the fail level), device" \
        "$($PY -c "import json; print(json.load(open('$OUT/lint_example.json'))['device'])" 2>&1)"
    ;;
tests)
    parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
    (cd /tmp && step tests 90 $PY -m pytest -q -p no:cacheprovider $parallel -o addopts= -rf \
        --tb=short \
        -c "$ROOT/pyproject.toml" --rootdir "$ROOT" "$ROOT/tests/test_onnx_ops.py" \
        "$ROOT/tests/test_live.py" "$ROOT/tests/test_torchscript_loader.py" \
        "$ROOT/tests/test_signal_reach.py" -k "accelerator or cuda")
    sed -n '/= FAILURES =/,$p' "$OUT/tests.log" | cut -c1-200 | head -150
    tail -1 "$OUT/tests.log"
    ;;
overhead)
    step overhead 100 $PY bench/probe_overhead.py --device cuda --check --batch 8 --warmup 5 \
        --repeat ${OVERHEAD_REPEAT:-20}
    grep -v "repetition" "$OUT/overhead.log" | grep -v "^BENCH" | tail -8
    ;;
profile)
    step profile 90 $PY bench/probe_profile.py --device cuda --variant torchscript --batch 8
    grep -E "^## |^resnet|Self CPU time total|Self CUDA time total" "$OUT/profile.log"
    ;;
overhead64)
    step overhead64 120 $PY bench/probe_overhead.py --device cuda --batch 64 --warmup 3 \
        --repeat 10
    grep -v "repetition" "$OUT/overhead64.log" | grep -v "^BENCH" | tail -5
    ;;
resnet50)
    step resnet50 120 $PY bench/big_models.py --device cuda --rounds 10 --models resnet50
    sed -n '/^| model/,$p' "$OUT/resnet50.log"
    ;;
big)
    step big 200 $PY bench/big_models.py --device cuda --rounds 10 --lint resnet50
    sed -n '/^| model/,$p' "$OUT/big.log"
    ;;
parity)
    step parity 130 $PY bench/gpu_parity.py --families ${PARITY_FAMILIES:-resnet18 efficientnet vit bert gpt2 llama}
    grep -E "DIFFERENT|error|cases with" "$OUT/parity.log" | tail -12
    ;;
decoder)
    step decoder 130 $PY bench/big_models.py --device cuda --models decoder-1b \
        --formats torchscript --rounds 5
    sed -n '/^| model/,$p' "$OUT/decoder.log"
    ;;
esac; done
echo "done after $(( $(date +%s) - began ))s"
