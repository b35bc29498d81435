#!/usr/bin/env bash
# Run ON THE GPU MACHINE (issue 8): install the carried wheels, then measure on the GPU what dcnc promises:
# ORT CUDA FP32/FP16 (and TensorRT, where `tensorrt` imports) bundles of the example towers verified against
# PyTorch on CUDA, `dcnc bench --device cuda` at batch 1/64/256/4096, the cross/deep concurrency of the parallel
# tower, the FP16/BF16 MatMul peak, and the tests marked gpu/tensorrt. Everything lands in $OUT (default
# runs/gpu); scripts/gpu/results.py turns it into the table of docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
exec > >(tee "$OUT/log.txt") 2>&1

parts=(.whl/ort-gpu/*.whl.*)
if [ -e "${parts[0]}" ]; then
    wheel=/tmp/$(basename "${parts[0]%.*}")
    cat "${parts[@]}" > "$wheel"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheel" .whl/small/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
# onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* wheels PyTorch brought along
"$PY" -c "import onnxruntime as ort; ort.preload_dlls(); print(ort.__version__, ort.get_available_providers())" \
    | tee "$OUT/ort.txt"

"$PY" -m cli run scripts/gpu/pipeline.toml --out runs/gpu/pipeline --quiet --json > "$OUT/run_summary.json"
echo "dcnc run (ORT CUDA): exit $?"
if "$PY" -c "import tensorrt" 2>/dev/null; then
    "$PY" -m cli run scripts/gpu/pipeline_tensorrt.toml --out runs/gpu/pipeline --quiet --json > "$OUT/run_tensorrt.json"
    echo "dcnc run (TensorRT): exit $?"
fi
"$PY" -m cli bench runs/gpu/pipeline/two_tower/train/two_tower.pt --device cuda --aot \
    --batch-sizes 1,64,256,4096 --json "$OUT/bench_two_tower.json" --out runs/gpu/bench
echo "dcnc bench: exit $?"
"$PY" scripts/gpu/branches.py runs/gpu/pipeline/two_tower/train/two_tower.pt --json "$OUT/branches.json"
"$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests 2>&1 | tail -n 30 > "$OUT/pytest_gpu.txt"
cat "$OUT/pytest_gpu.txt"
"$PY" scripts/gpu/results.py "$OUT" > "$OUT/results.md"
cat "$OUT/results.md"
