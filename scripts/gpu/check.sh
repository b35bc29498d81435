#!/usr/bin/env bash
# The GPU check (issue 16; docs/gpu.md gives the device tool's exact call sequence). One script, four uses:
#
#   bash scripts/gpu/check.sh prepare     HERE (CPU, PyPI reachable): fills .gpu-data/ (which .git/info/exclude
#                                         ignores): the example models trained on CPU, their ONNX exports,
#                                         evaluation and calibration data, and the wheels the GPU machine lacks,
#                                         onnxruntime-gpu cut into parts of at most 61 MiB
#   bash scripts/gpu/check.sh stash       ON THE GPU MACHINE, in each call that carries wheel parts: checks their
#                                         sha256 and keeps them in /tmp/dcnc-gpu for the call that runs the check
#   bash scripts/gpu/check.sh             ON THE GPU MACHINE: the check (about 5 minutes); results in $OUT
#   bash scripts/gpu/check.sh --dry-run   HERE: every step and every file, on the CPU backends (ort, torch on CPU)
#
# The check's steps, in order of value, each under its own `timeout` and within one budget (GPU_CHECK_BUDGET,
# default 420 s, so the results are written before a caller's 10-minute limit): install the carried wheels; a
# real CUDA session and a TF32 on/off parity probe; pytest -m "gpu or tensorrt"; build + verify --device cuda of
# the ORT CUDA fp32/fp16 targets of both example models (and TensorRT's where `import tensorrt` works); one
# --cuda-graph build; bench --device cuda (eager, ORT CUDA fp32/fp16); branch timing. Nothing is trained, and
# nothing compiled by torch.compile / AOTInductor unless --compile is given. At most 5 files come back in $OUT:
# results.md (the tables of docs/gpu.md), check.json, verify.json, bench.json, log.txt.
#
# On a CUDA machine with internet the same command works unchanged: without carried parts it pip-installs the
# wheels from the index, and without .gpu-data/ it prepares that first.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SCRIPT="$ROOT/scripts/gpu/check.sh"
cd "$ROOT"

# --- what is carried: pinned wheels (scripts/gpu/wheels.sha256 holds their sha256 and their parts') ------------
ORT_GPU_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl  # built for CUDA 13, as torch 2.11 there
SMALL_WHEELS=(faiss-cpu==1.15.1 polygraphy==0.53.6 tomli-w==1.2.0)           # dcnc's dependencies the image lacks
PART_SIZE=61M
SUMS="$ROOT/scripts/gpu/wheels.sha256"
DATA="$ROOT/.gpu-data"
STASH=/tmp/dcnc-gpu

pip_platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

checked() {  # checked FILE: true when FILE's sha256 is the one wheels.sha256 pins for its name
    local want
    want=$(awk -v n="$(basename "$1")" '$2 == n {print $1}' "$SUMS")
    [ -n "$want" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$want" ]
}

# --- prepare (here) -------------------------------------------------------------------------------------------
prepare() {
    local py=${PY:-$ROOT/.venv/bin/python}
    local exclude
    exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) && mkdir -p "$(dirname "$exclude")" \
        && { grep -qx '/.gpu-data/' "$exclude" 2>/dev/null || echo '/.gpu-data/' >> "$exclude"; }
    mkdir -p "$DATA/models" "$DATA/onnx/two_tower" "$DATA/onnx/ranker"
    if [ ! -f "$DATA/models/ranker.pt" ]; then
        "$py" -m cli train --out "$DATA/models" --quiet || return 1
    fi
    if [ ! -f "$DATA/onnx/ranker/ranker.onnx" ]; then
        "$py" -m cli export "$DATA/models/two_tower.pt" -o "$DATA/onnx/two_tower" --force || return 1
        "$py" -m cli export "$DATA/models/ranker.pt" -o "$DATA/onnx/ranker/ranker.onnx" --force || return 1
    fi
    [ "${1:-}" = "--no-wheels" ] && return 0
    mkdir -p "$DATA/wheels/ort" "$DATA/wheels/small" "$DATA/wheels/download"
    "$py" -m pip download -q --no-deps "${pip_platform[@]}" -d "$DATA/wheels/download" \
        "onnxruntime-gpu==$(echo "$ORT_GPU_WHEEL" | cut -d- -f2)" "${SMALL_WHEELS[@]}" || return 1
    for wheel in "$DATA"/wheels/download/*.whl; do
        checked "$wheel" || { echo "prepare: $(basename "$wheel") is not the one wheels.sha256 pins"; return 1; }
    done
    mv "$DATA"/wheels/download/*.whl "$DATA/wheels/small/"
    mv "$DATA/wheels/small/$ORT_GPU_WHEEL" "$DATA/wheels/"
    rm -f "$DATA"/wheels/ort/*
    split -b "$PART_SIZE" -d -a 1 "$DATA/wheels/$ORT_GPU_WHEEL" "$DATA/wheels/ort/$ORT_GPU_WHEEL.part"
    rm -f "$DATA/wheels/$ORT_GPU_WHEEL"
    for part in "$DATA"/wheels/ort/*; do
        checked "$part" || { echo "prepare: $(basename "$part") does not match scripts/gpu/wheels.sha256"; return 1; }
    done
    rmdir "$DATA/wheels/download"
    du -sh "$DATA"/models "$DATA"/onnx "$DATA"/wheels/small "$DATA"/wheels/ort/*
}

# --- stash (GPU machine, calls that carry parts) --------------------------------------------------------------
stash() {
    mkdir -p "$STASH"
    local file status=0
    for file in "$DATA"/wheels/ort/* "$DATA"/wheels/small/*.whl; do
        [ -f "$file" ] || continue
        if checked "$file"; then cp "$file" "$STASH/"; echo "stashed $(basename "$file")"
        else echo "stash: $(basename "$file") does not match scripts/gpu/wheels.sha256 (a broken carry?)"; status=1; fi
    done
    ls -la "$STASH"
    return $status
}

# --- the check's steps ----------------------------------------------------------------------------------------
step_install() {
    local marker="$SITE/.installed-$ORT_GPU_WHEEL"
    [ -f "$marker" ] && { echo "already installed in $SITE"; return 0; }
    mkdir -p "$STASH" "$SITE"
    local parts=() name file
    for name in $(awk '$2 ~ /\.part[0-9]+$/ {print $2}' "$SUMS" | sort); do
        file="$DATA/wheels/ort/$name"; [ -f "$file" ] || file="$STASH/$name"
        [ -f "$file" ] && checked "$file" && parts+=("$file")
    done
    local wanted
    wanted=$(grep -c '\.part[0-9]*$' "$SUMS")
    if [ "${#parts[@]}" = "$wanted" ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        cat "${parts[@]}" > "$STASH/$ORT_GPU_WHEEL"
        checked "$STASH/$ORT_GPU_WHEEL" || { echo "install: the joined $ORT_GPU_WHEEL fails its sha256"; return 1; }
        local small=()
        for name in $(awk '$2 ~ /\.whl$/ {print $2}' "$SUMS"); do
            [ "$name" = "$ORT_GPU_WHEEL" ] && continue
            file="$DATA/wheels/small/$name"; [ -f "$file" ] || file="$STASH/$name"
            [ -f "$file" ] && checked "$file" && small+=("$file")
        done
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$STASH/$ORT_GPU_WHEEL" "${small[@]}" || return 1
    else
        echo "install: ${#parts[@]} of $wanted wheel parts here; installing from the package index instead"
        "$PY" -m pip install -q --no-deps --upgrade --target "$SITE" \
            "onnxruntime-gpu==$(echo "$ORT_GPU_WHEEL" | cut -d- -f2)" "${SMALL_WHEELS[@]}" || return 1
    fi
    touch "$marker"
}

step_probe() {
    "$PY" scripts/gpu/probe.py "$DATA/models/two_tower.pt" "$DATA/onnx/two_tower/query.onnx" --tower query \
        --batch "$BIG_BATCH" --json "$WORK/probe.json" ${DRY:+--dry-run}
}

step_pytest() {
    # a test module that cannot be imported here (a package this machine lacks) must not stop the GPU tests
    "$PY" -m pytest -m "gpu or tensorrt" -p no:cacheprovider --continue-on-collection-errors -q -rs tests 2>&1 \
        | tee "$WORK/pytest.txt"
}

build_and_verify() {  # build_and_verify NAME MODEL BACKEND PRECISION [build options...]
    local name=$1 model=$2 backend=$3 precision=$4
    shift 4
    local calib=()
    [ "$precision" != fp32 ] && calib=(--calib "$DATA/models")
    "$PY" -m cli build "$DATA/onnx/$model" -o "$WORK/bundles/$name" --backend "$backend" --precision "$precision" \
        --batch 1:256:4096 "${calib[@]}" --force "$@" || return 1
    "$PY" -m cli verify "$DATA/models/$model.pt" "$WORK/bundles/$name" --data "$DATA/models/${model}_eval.npz" \
        --device "$DEVICE" --k 10,100 --batch-sizes "$BATCHES" --iterations "$ITERATIONS" --warmup "$WARMUP" \
        --latency-budget "$LATENCY_BUDGET" --no-branches --quiet --report "$WORK/verify/$name.json"
}

step_verify() {
    local failed=0 model precision backends=("$BACKEND")
    [ -z "$DRY" ] && "$PY" -c "import tensorrt" 2>/dev/null && backends+=(tensorrt)
    for backend in "${backends[@]}"; do
        for model in two_tower ranker; do
            for precision in fp32 fp16 $([ "$backend" = tensorrt ] && echo int8); do
                build_and_verify "$model-$backend-$precision" "$model" "$backend" "$precision" || failed=$((failed + 1))
            done
        done
    done
    return $failed
}

step_cudagraph() {
    local graph=(--cuda-graph)
    [ -n "$DRY" ] && graph=()  # the CPU provider has no CUDA graphs: the same build without them
    build_and_verify "two_tower-$BACKEND-fp32-cuda-graph" two_tower "$BACKEND" fp32 "${graph[@]}"
}

step_bench() {
    local runners=eager,$BACKEND-fp32,$BACKEND-fp16
    [ -n "$COMPILE" ] && runners=eager,compile,$BACKEND-fp32,$BACKEND-fp16
    "$PY" -m cli bench "$DATA/models/two_tower.pt" --device "$DEVICE" --runners "$runners" ${COMPILE:+--aot} \
        --tower query --calib "$DATA/models" --batch-sizes "$BATCHES" --iterations "$ITERATIONS" --warmup "$WARMUP" \
        --out "$WORK/bench-cache" --json "$WORK/bench.json" --quiet
}

step_branches() {
    "$PY" scripts/gpu/branches.py "$DATA/models/two_tower.pt" --batch "$BIG_BATCH" --device "$DEVICE" \
        --repeats "$((ITERATIONS * 4))" --json "$WORK/branches.json"
}

skip() {  # skip NAME REASON: record a step that does not run
    printf '%s\t\t0\t%s\n' "$1" "$2" >> "$WORK/steps.tsv"
    echo "== $1: skipped, $2"
}

step() {  # step NAME CAP: run step_NAME under `timeout`, for at most CAP seconds and what the budget leaves
    local name=$1 cap=$2 left limit start rc note=""
    left=$((DEADLINE - SECONDS - RESERVE))
    limit=$((cap < left ? cap : left))
    ((limit < 10)) && { skip "$name" "no time left of the $BUDGET s budget"; return; }
    echo "== $name (at most ${limit} s)"
    start=$SECONDS
    timeout -k 5 "$limit" bash "$SCRIPT" --step "$name"
    rc=$?
    ((rc == 124 || rc == 137)) && note="timed out after ${limit} s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$note" >> "$WORK/steps.tsv"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

check() {
    rm -rf "$WORK" && mkdir -p "$WORK/verify" "$OUT"
    rm -f "$OUT"/{results.md,check.json,verify.json,bench.json,log.txt}
    exec > >(tee -a "$WORK/log.txt") 2>&1
    {
        if [ -n "$DRY" ]; then
            echo "dry run on CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
                 "load $(cut -d' ' -f1 /proc/loadavg)): ONNX Runtime's CPU provider for ort-cuda, torch on CPU," \
                 "no CUDA graphs, no TF32"
        else nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1; fi
        "$PY" -c 'import platform, torch; print(f"Python {platform.python_version()}, torch {torch.__version__},", end=" ")
print(f"CUDA {torch.version.cuda}")'
    } > "$WORK/machine.txt"
    cat "$WORK/machine.txt"
    if [ -n "$DRY" ]; then skip install "dry run: the installed onnxruntime (CPU) stands in for onnxruntime-gpu"
    else step install 120; fi
    if [ ! -f "$DATA/onnx/ranker/ranker.onnx" ]; then  # a machine nothing was carried to: outside the budget
        local start=$SECONDS
        echo "== no .gpu-data/: preparing it on this machine's CPU (training the examples)"
        prepare --no-wheels || exit 2
        DEADLINE=$((DEADLINE + SECONDS - start))
    fi
    step probe 90
    step verify 210
    step pytest 150
    step cudagraph 60
    step bench 150
    step branches 60
    "$PY" scripts/gpu/results.py "$WORK" "$OUT" > /dev/null
    cat "$OUT/results.md"
    [ -f "$WORK/bench.json" ] && cp "$WORK/bench.json" "$OUT/"
    echo "== done in $SECONDS s; in $OUT: $(cd "$OUT" && echo *) log.txt"
    cp "$WORK/log.txt" "$OUT/log.txt"
}

# --- dispatch -------------------------------------------------------------------------------------------------
if [ "${1:-}" = --step ]; then  # one step, run by `step` under its timeout with the settings exported below
    "step_$2"
    exit
fi
DRY="" COMPILE="" MODE=check
while [ $# -gt 0 ]; do
    case $1 in
        prepare|stash) MODE=$1 ;;
        --dry-run) DRY=1 ;;
        --compile) COMPILE=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "check.sh: unknown argument $1 (see --help)"; exit 2 ;;
    esac
    shift
done
case $MODE in
    prepare) prepare; exit ;;
    stash) stash; exit ;;
esac

export ROOT DATA STASH DRY COMPILE
export WORK=${GPU_CHECK_WORK:-$ROOT/runs/gpu-check}
export OUT=${OUT:-$WORK-out}
export SITE=$STASH/site
export BUDGET=${GPU_CHECK_BUDGET:-420} RESERVE=15
export DEADLINE=$((SECONDS + BUDGET))
export PYTHONUNBUFFERED=1
if [ -n "$DRY" ]; then  # the same steps, fewer and smaller timed calls: a 2-core CPU is ~100x slower
    export PY=${PY:-$ROOT/.venv/bin/python} BACKEND=ort DEVICE=cpu BATCHES=1,64 BIG_BATCH=256 ITERATIONS=5 WARMUP=2
    export LATENCY_BUDGET=0 PYTHONPATH=$ROOT
else
    export PY=${PY:-python3} BACKEND=ort-cuda DEVICE=cuda BATCHES=1,64,256,4096 BIG_BATCH=4096 ITERATIONS=50 WARMUP=10
    export LATENCY_BUDGET=1  # seconds of extra rounds per batch size when a speedup's interval is wide
    export PYTHONPATH=$SITE:$ROOT  # the carried onnxruntime-gpu before the image's CPU onnxruntime
    # the CUDA 13 / cuDNN libraries of torch's nvidia wheels, for onnxruntime's CUDA provider (see probe.py)
    nvidia=$("$PY" -c 'import glob, os, site
print(":".join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], "nvidia", "*", "lib")))))')
    export LD_LIBRARY_PATH=$nvidia${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
check
