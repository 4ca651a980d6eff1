#!/usr/bin/env bash
# make bench-gpu on a GPU machine lent through the device tool, in one call (its time is short).
#
# Here (registry access), once:   bash bench/device.sh wheels
#   puts what that machine lacks in .whl/ (git-ignored through .git/info/exclude): diffusers 0.42.1.
#   It has Python 3.12 with torch (CUDA), transformers 5, accelerate, safetensors, pillow (../shared/FACTS.md).
# There (device run, carry [".whl"]):   bash bench/device.sh run
#   installs the wheels, runs bench.gpu with full-size random weights, and writes the report and the log
#   under $OUT. Rows are printed as they are measured, so a run cut short keeps what it measured.
#   BENCH_ARGS passes options (e.g. BENCH_ARGS="--compile none --repeats 1"); BENCH_TIMEOUT (seconds,
#   default 540) stops it inside a 600 s call.
# Without CUDA, `DEVICE_PYTHON=.venv/bin/python BENCH_ARGS="--device cpu --tiny ..." bash bench/device.sh run`
# runs the same steps on CPU (tests/test_bench.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${DEVICE_PYTHON:-python3}
wheels=.whl

case "${1:-}" in
wheels)
    grep -qx "/$wheels/" .git/info/exclude 2>/dev/null || echo "/$wheels/" >>.git/info/exclude
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d "$wheels" "$(grep -E '^diffusers==' env/serving.txt | cut -d' ' -f1)"
    ls -l "$wheels"
    ;;
run)
    out=${OUT:-out/device}
    mkdir -p "$out"
    if compgen -G "$wheels/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/sdmme-site "$wheels"/*.whl
        export PYTHONPATH="/tmp/sdmme-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee "$out/gpu.txt"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout "${BENCH_TIMEOUT:-540}" "$python" -m bench.gpu --out "$out/benchmarks.md" \
        --weights-cache /tmp/sdmme-weights ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
    ;;
*)
    echo "usage: bash bench/device.sh wheels|run" >&2
    exit 2
    ;;
esac
