#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before the GPU run: fetch the wheels the GPU machine lacks (it has no internet;
# python3 there is 3.12 with torch built for CUDA 13) into .whl/ (git-ignored), and cut onnxruntime-gpu (~250 MB)
# into 50 MiB parts, since one call to the GPU machine carries at most 64 MiB. docs/gpu.md has the call sequence.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}   # 1.31's CUDA build is for CUDA 13 (its [cuda] extra: nvidia-cuda-runtime~=13.0)
fetch() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
rm -rf .whl && mkdir -p .whl/small .whl/ort-gpu
fetch .whl/small faiss-cpu polygraphy tomli-w        # dcnc's dependencies missing from the GPU image
fetch .whl "$ORT_GPU"
wheel=$(ls .whl/onnxruntime_gpu-*.whl)
split -b 50M -d "$wheel" ".whl/ort-gpu/$(basename "$wheel")."
rm "$wheel"
ls -la .whl/small .whl/ort-gpu
