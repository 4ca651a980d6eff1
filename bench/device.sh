#!/usr/bin/env bash
# The GPU measurements on a machine lent through the device tool: torch with CUDA, no diffusers, no
# tritonserver, no registry, 64 MiB carried per call and a short time (../shared/FACTS.md).
#
# Here (registry access), once:   bash bench/device.sh wheels
#   .whl/: diffusers and numpy<2 (the Python backend stub needs it); .whl-triton/: nvidia-pytriton
#   (tritonserver). Both git-ignored through .git/info/exclude. Too big for one call together.
# There, two calls in a row (wheels installed by one stay in /tmp while the machine is warm):
#   carry [".whl"]:         bash bench/device.sh run     make bench-gpu (full-size random weights)
#   carry [".whl-triton"]:  bash bench/device.sh serve   the four models served by tritonserver, called
#                                                        with the AWS sample's payloads (bench/served.py)
#   Each writes its report and log under $OUT and prints rows as they are measured, so a run cut short
#   keeps what it measured. BENCH_ARGS passes options (e.g. "--compile none --repeats 1"); BENCH_TIMEOUT
#   (seconds, default 540) stops it inside a 600 s call.
# Without CUDA, DEVICE_PYTHON=.venv/bin/python and tiny settings in BENCH_ARGS run the same steps on CPU
# (tests/test_bench.py, with DEVICE_WHEELS= empty: wheels fetched here are for the device's Python;
# DEVICE_SITE: where wheels are installed, /tmp/sdmme-site by default).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${DEVICE_PYTHON:-python3}
site=${DEVICE_SITE:-/tmp/sdmme-site}
carried=${DEVICE_WHEELS-.whl*/*.whl}  # the wheels a call carried (empty: none, as in the tests)
out=${OUT:-out/device}

download() {  # folder, requirements...
    local folder=$1
    shift
    grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$folder" "$@"
}

install_carried() {
    local wheels=""
    [ -z "$carried" ] || wheels=$(compgen -G "$carried" || true)
    if [ -n "$wheels" ]; then
        # shellcheck disable=SC2086  # one word per wheel
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" $wheels
    fi
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    mkdir -p "$out"
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee "$out/gpu.txt"
}

pin() { grep -E "^$1==" env/serving.txt | cut -d' ' -f1; }

case "${1:-}" in
wheels)
    download .whl "$(pin diffusers)" "$(pin numpy)"
    download .whl-triton "nvidia-pytriton==$("$python" -m pip show nvidia-pytriton | sed -n 's/^Version: //p')"
    du -sh .whl .whl-triton
    ;;
run)
    install_carried
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout "${BENCH_TIMEOUT:-540}" "$python" -m bench.gpu --out "$out/benchmarks.md" \
        --weights-cache /tmp/sdmme-weights ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
    ;;
serve)
    install_carried
    "$python" -c "import numpy, sys; sys.exit(numpy.__version__ >= '2')" || {
        echo "numpy<2 is not installed in $site (the stub crashes on BYTES with numpy 2): call 'run' with .whl first, on the same warm machine" >&2
        exit 2
    }
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-540}" "$python" -m bench.served --out "$out/served.md" \
        --repository /tmp/sdmme-weights ${BENCH_ARGS:-} 2>&1 | tee "$out/served.log"
    ;;
*)
    echo "usage: bash bench/device.sh wheels|run|serve" >&2
    exit 2
    ;;
esac
